# TileStream infrastructure: Pub/Sub, the bucket notification, BigQuery, Artifact Registry and a
# least-privilege worker service account. No credentials live here; apply with your own login.

terraform {
  required_version = ">= 1.5"
  required_providers {
    google = {
      source  = "hashicorp/google"
      version = ">= 5.30"
    }
  }
}

provider "google" {
  project = var.project
  region  = var.region
}

locals {
  services = ["dataflow.googleapis.com", "pubsub.googleapis.com", "bigquery.googleapis.com",
    "storage.googleapis.com", "artifactregistry.googleapis.com", "cloudbuild.googleapis.com",
  "run.googleapis.com", "cloudscheduler.googleapis.com"]
  bucket_objects = "projects/_/buckets/${google_storage_bucket.tiles.name}/objects/"
}

resource "google_project_service" "apis" {
  for_each           = toset(local.services)
  service            = each.value
  disable_on_destroy = false
}

data "google_project" "this" {}

# --- storage --------------------------------------------------------------------------------

resource "google_storage_bucket" "tiles" {
  #checkov:skip=CKV_GCP_78:no versioning on purpose: a replaced input must 404 at its old generation, which is how a read detects it was superseded (transforms/storage.py)
  #checkov:skip=CKV_GCP_62:a usage log of every range read of a stream costs more than it tells; Cloud Audit Logs record the access that matters (docs/deploy.md)
  name                        = "${var.project}-${var.name}-tiles"
  location                    = var.region
  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"
}

resource "google_storage_bucket" "dataflow" {
  #checkov:skip=CKV_GCP_78:staging and temp files only, rewritten every launch and deleted after 14 days; old generations have no use
  #checkov:skip=CKV_GCP_62:staging and temp files only; Cloud Audit Logs record the access that matters (docs/deploy.md)
  name                        = "${var.project}-${var.name}-dataflow"
  location                    = var.region
  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"
  lifecycle_rule {
    condition {
      age = 14
    }
    action {
      type = "Delete"
    }
  }
}

# --- pub/sub --------------------------------------------------------------------------------

resource "google_pubsub_topic" "tiles" {
  #checkov:skip=CKV_GCP_83:Google-managed encryption at rest; the data (public imagery, land-cover predictions) needs no customer-managed key
  name       = "${var.name}-tiles"
  depends_on = [google_project_service.apis]
}

resource "google_pubsub_topic" "dead_letter" {
  #checkov:skip=CKV_GCP_83:Google-managed encryption at rest; the data (public imagery, land-cover predictions) needs no customer-managed key
  name       = "${var.name}-tiles-dead-letter"
  depends_on = [google_project_service.apis]
}

resource "google_pubsub_subscription" "tiles" {
  name                       = "${var.name}-tiles-sub"
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

resource "google_pubsub_subscription" "dead_letter" {
  name                       = "${var.name}-tiles-dead-letter-sub"
  topic                      = google_pubsub_topic.dead_letter.id
  message_retention_duration = "604800s"
}

# The stream's result events (docs/results.md): one message per outcome consumers read.
resource "google_pubsub_topic" "results" {
  #checkov:skip=CKV_GCP_83:Google-managed encryption at rest; the events carry land-cover predictions of public imagery, no customer-managed key needed
  name                       = "${var.name}-results"
  message_retention_duration = "86400s"
  depends_on                 = [google_project_service.apis]
}

# An example consumer: answers the model did not flag as drifted, filtered by Pub/Sub on the
# events' attributes (a consumer of every event makes a subscription without a filter).
resource "google_pubsub_subscription" "results_answered" {
  name                       = "${var.name}-results-answered"
  topic                      = google_pubsub_topic.results.id
  filter                     = "attributes.outcome = \"answered\" AND attributes.drifted = \"false\""
  ack_deadline_seconds       = 60
  message_retention_duration = "604800s"
}

# Pub/Sub's service agent forwards undeliverable messages to the dead-letter topic.
locals {
  pubsub_agent = "serviceAccount:service-${data.google_project.this.number}@gcp-sa-pubsub.iam.gserviceaccount.com"
}

resource "google_pubsub_topic_iam_member" "dead_letter_publisher" {
  topic  = google_pubsub_topic.dead_letter.id
  role   = "roles/pubsub.publisher"
  member = local.pubsub_agent
}

resource "google_pubsub_subscription_iam_member" "dead_letter_forwarder" {
  subscription = google_pubsub_subscription.tiles.id
  role         = "roles/pubsub.subscriber"
  member       = local.pubsub_agent
}

# --- the bucket notification ------------------------------------------------------------------

data "google_storage_project_service_account" "gcs" {}

resource "google_pubsub_topic_iam_member" "gcs_publisher" {
  topic  = google_pubsub_topic.tiles.id
  role   = "roles/pubsub.publisher"
  member = "serviceAccount:${data.google_storage_project_service_account.gcs.email_address}"
}

resource "google_storage_notification" "new_tiles" {
  bucket             = google_storage_bucket.tiles.name
  payload_format     = "JSON_API_V1"
  topic              = google_pubsub_topic.tiles.id
  event_types        = ["OBJECT_FINALIZE"]
  object_name_prefix = var.input_prefix
  depends_on         = [google_pubsub_topic_iam_member.gcs_publisher]
}

# --- bigquery ---------------------------------------------------------------------------------

resource "google_bigquery_dataset" "tilestream" {
  #checkov:skip=CKV_GCP_81:Google-managed encryption at rest; the data (public imagery, land-cover predictions) needs no customer-managed key
  dataset_id = var.dataset
  location   = var.region
  depends_on = [google_project_service.apis]
}

resource "google_bigquery_table" "chips" {
  #checkov:skip=CKV_GCP_80:Google-managed encryption at rest; the data (public imagery, land-cover predictions) needs no customer-managed key
  dataset_id          = google_bigquery_dataset.tilestream.dataset_id
  table_id            = "chips"
  schema              = file("${path.module}/../bigquery/chips.json")
  clustering          = ["tile_id", "model_version"]
  deletion_protection = true
  time_partitioning {
    type  = "DAY"
    field = "event_time"
  }
}

resource "google_bigquery_table" "tiles" {
  #checkov:skip=CKV_GCP_80:Google-managed encryption at rest; the data (public imagery, land-cover predictions) needs no customer-managed key
  dataset_id          = google_bigquery_dataset.tilestream.dataset_id
  table_id            = "tiles"
  schema              = file("${path.module}/../bigquery/tiles.json")
  clustering          = ["tile_id", "model_version"]
  deletion_protection = true
  time_partitioning {
    type  = "DAY"
    field = "event_time"
  }
}

resource "google_bigquery_table" "dead_letters" {
  #checkov:skip=CKV_GCP_80:Google-managed encryption at rest; the data (public imagery, land-cover predictions) needs no customer-managed key
  dataset_id          = google_bigquery_dataset.tilestream.dataset_id
  table_id            = "dead_letters"
  schema              = file("${path.module}/../bigquery/dead_letters.json")
  deletion_protection = true
  time_partitioning {
    type  = "DAY"
    field = "time"
  }
}

resource "google_bigquery_table" "events" {
  #checkov:skip=CKV_GCP_80:Google-managed encryption at rest; the data (public imagery, land-cover predictions) needs no customer-managed key
  dataset_id          = google_bigquery_dataset.tilestream.dataset_id
  table_id            = "events"
  schema              = file("${path.module}/../bigquery/events.json")
  deletion_protection = true
  time_partitioning {
    type  = "DAY"
    field = "time"
  }
}

resource "google_bigquery_table" "messages" {
  #checkov:skip=CKV_GCP_80:Google-managed encryption at rest; the data (public imagery, land-cover predictions) needs no customer-managed key
  dataset_id          = google_bigquery_dataset.tilestream.dataset_id
  table_id            = "messages"
  schema              = file("${path.module}/../bigquery/messages.json")
  deletion_protection = true
  time_partitioning {
    type  = "DAY"
    field = "received_at"
  }
}

resource "google_bigquery_table" "changes" {
  #checkov:skip=CKV_GCP_80:Google-managed encryption at rest; the data (public imagery, land-cover predictions) needs no customer-managed key
  dataset_id          = google_bigquery_dataset.tilestream.dataset_id
  table_id            = "changes"
  schema              = file("${path.module}/../bigquery/changes.json")
  clustering          = ["location_key", "model_version"]
  deletion_protection = true
  time_partitioning {
    type  = "DAY"
    field = "detected_at"
  }
}

# --- artifact registry ------------------------------------------------------------------------

resource "google_artifact_registry_repository" "images" {
  #checkov:skip=CKV_GCP_84:Google-managed encryption at rest; the images (open-source software and the project's code) needs no customer-managed key
  repository_id = var.name
  location      = var.region
  format        = "DOCKER"
  depends_on    = [google_project_service.apis]
}

# --- the worker service account: least privilege -----------------------------------------------

resource "google_service_account" "worker" {
  account_id   = "${var.name}-worker"
  display_name = "TileStream Dataflow workers and Flex Template launcher"
}

locals {
  worker = "serviceAccount:${google_service_account.worker.email}"
}

# Least privilege, checked from needs (pipeline/ops/iam.py; docs/deploy.md has the table): every
# grant below is needed by a call the stream made on the local stack, and none is missing.
#
# roles/dataflow.worker is required to run work items, and it carries storage.objects.get and
# storage.objects.create on the whole project: reads of the input and writes of predictions
# need no grant of their own, and no prefix condition can narrow them. What it lacks is granted
# here: deleting (strip pieces once stitched, rewritten outputs, load-job temp files),
# BigQuery jobs (chip rows are loaded), tables, and the one subscription.
resource "google_project_iam_member" "dataflow_worker" {
  project = var.project
  role    = "roles/dataflow.worker"
  member  = local.worker
}

# Chip rows reach BigQuery in load jobs: jobs are created in the project.
resource "google_project_iam_member" "worker_runs_load_jobs" {
  project = var.project
  role    = "roles/bigquery.jobUser"
  member  = local.worker
}

# Consume one subscription, nothing else in Pub/Sub.
resource "google_pubsub_subscription_iam_member" "worker_subscriber" {
  subscription = google_pubsub_subscription.tiles.id
  role         = "roles/pubsub.subscriber"
  member       = local.worker
}

# Publish the result events to their one topic, nothing else.
resource "google_pubsub_topic_iam_member" "worker_publishes_results" {
  topic  = google_pubsub_topic.results.id
  role   = "roles/pubsub.publisher"
  member = local.worker
}

resource "google_pubsub_subscription_iam_member" "worker_subscription_viewer" {
  subscription = google_pubsub_subscription.tiles.id
  role         = "roles/pubsub.viewer"
  member       = local.worker
}

# Replace and delete under the output prefix only: assembly reads strip pieces back and deletes
# them once the COG is stitched, and a retried or replayed tile rewrites its COG and STAC Item
# (overwriting an object needs storage.objects.delete).
resource "google_storage_bucket_iam_member" "worker_manages_output" {
  bucket = google_storage_bucket.tiles.name
  role   = "roles/storage.objectUser"
  member = local.worker
  condition {
    title      = "output-prefix-only"
    expression = "resource.name.startsWith(\"${local.bucket_objects}${var.output_prefix}\")"
  }
}

# Dataflow's own staging and temp files (chip-row load jobs stage there), in a bucket of their own.
resource "google_storage_bucket_iam_member" "worker_dataflow_bucket" {
  bucket = google_storage_bucket.dataflow.name
  role   = "roles/storage.objectAdmin"
  member = local.worker
}

# Write rows (and create the tables if someone dropped them) in one dataset.
resource "google_bigquery_dataset_iam_member" "worker_data_editor" {
  dataset_id = google_bigquery_dataset.tilestream.dataset_id
  role       = "roles/bigquery.dataEditor"
  member     = local.worker
}

# Pull the one image.
resource "google_artifact_registry_repository_iam_member" "worker_image_reader" {
  repository = google_artifact_registry_repository.images.name
  location   = var.region
  role       = "roles/artifactregistry.reader"
  member     = local.worker
}
