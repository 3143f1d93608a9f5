# Blue-green releases of the stream itself (docs/operations.md, "Releasing the stream").
#
# A new release runs beside the live one on a subscription of its own, so both see every
# message. Two subscription slots of the tiles topic take turns: the live job reads one, a green
# job the other (`templates/deploy.sh bluegreen` first seeks the idle slot to a snapshot of the
# live slot, so the green job takes in everything the live job has not acknowledged: its backlog
# too, which the handover then covers). Slot "a" is the subscription main.tf has always
# declared; this is slot "b", configured the same.
resource "google_pubsub_subscription" "tiles_b" {
  name                       = "${var.name}-tiles-sub-b"
  topic                      = google_pubsub_topic.tiles.id
  ack_deadline_seconds       = 60
  message_retention_duration = "604800s"
  retry_policy {
    minimum_backoff = "10s"
    maximum_backoff = "600s"
  }
  dead_letter_policy {
    dead_letter_topic     = google_pubsub_topic.dead_letter.id
    max_delivery_attempts = 10
  }
}

resource "google_pubsub_subscription_iam_member" "dead_letter_forwarder_b" {
  subscription = google_pubsub_subscription.tiles_b.id
  role         = "roles/pubsub.subscriber"
  member       = local.pubsub_agent
}

resource "google_pubsub_subscription_iam_member" "worker_subscriber_b" {
  subscription = google_pubsub_subscription.tiles_b.id
  role         = "roles/pubsub.subscriber"
  member       = local.worker
}

resource "google_pubsub_subscription_iam_member" "worker_subscription_viewer_b" {
  subscription = google_pubsub_subscription.tiles_b.id
  role         = "roles/pubsub.viewer"
  member       = local.worker
}

# Whoever releases (the model operators: the release channel lives in the registry's
# channels.json) seeks the idle slot before a green job starts on it...
resource "google_pubsub_subscription_iam_member" "operators_seek_slot_a" {
  for_each     = toset(var.model_operators)
  subscription = google_pubsub_subscription.tiles.id
  role         = "roles/pubsub.subscriber"
  member       = each.value
}

resource "google_pubsub_subscription_iam_member" "operators_seek_slot_b" {
  for_each     = toset(var.model_operators)
  subscription = google_pubsub_subscription.tiles_b.id
  role         = "roles/pubsub.subscriber"
  member       = each.value
}

# ...from a snapshot of the live slot, taken and deleted by `tilestream release green`. Snapshots
# are project resources named at run time, so no binding can name one: a custom role with the
# snapshot permissions only, on the project. Creating one also needs consume on the live slot
# (above), so the operators can snapshot nothing but the two slots.
resource "google_project_iam_custom_role" "release_snapshots" {
  project     = var.project
  role_id     = "tilestreamReleaseSnapshots"
  title       = "TileStream release: seed a green slot from a snapshot"
  permissions = ["pubsub.snapshots.create", "pubsub.snapshots.seek", "pubsub.snapshots.delete"]
}

resource "google_project_iam_member" "operators_seed_green_slot" {
  for_each = toset(var.model_operators)
  project  = var.project
  role     = google_project_iam_custom_role.release_snapshots.id
  member   = each.value
}

# ...reads the comparison of green against blue and waits for green to report the cut-over.
resource "google_project_iam_member" "operators_run_queries" {
  for_each = toset(var.model_operators)
  project  = var.project
  role     = "roles/bigquery.jobUser"
  member   = each.value
}

resource "google_bigquery_dataset_iam_member" "operators_read_rows" {
  for_each   = toset(var.model_operators)
  dataset_id = google_bigquery_dataset.tilestream.dataset_id
  role       = "roles/bigquery.dataViewer"
  member     = each.value
}

output "subscription_slots" {
  description = "The two subscriptions blue-green releases take turns on (slot a, slot b)."
  value       = "${google_pubsub_subscription.tiles.id},${google_pubsub_subscription.tiles_b.id}"
}
