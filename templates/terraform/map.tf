# The live map (`tilestream map`, pipeline/map) as a private Cloud Run service with an identity
# of its own: it reads the stream's rows (BigQuery) and the prediction COGs under the output
# prefix, nothing else. Private: no allUsers/allAuthenticatedUsers invoker; only the members of
# var.map_viewers may call it (open it through `gcloud run services proxy`, or put IAP in front).

variable "map_image" {
  description = "Image of the map service (templates/Dockerfile.map); empty: no service"
  type        = string
  default     = ""
}

variable "map_viewers" {
  description = "Members allowed to open the map (user:, group:, serviceAccount:), never allUsers"
  type        = list(string)
  default     = []
  validation {
    condition     = alltrue([for m in var.map_viewers : !contains(["allUsers", "allAuthenticatedUsers"], m)])
    error_message = "The map is private: allUsers and allAuthenticatedUsers may not invoke it."
  }
}

resource "google_service_account" "map" {
  account_id   = "${var.name}-map"
  display_name = "TileStream map (Cloud Run service)"
}

locals {
  map = "serviceAccount:${google_service_account.map.email}"
}

# Query the stream's tables: jobs in the project, reads in the one dataset.
resource "google_project_iam_member" "map_runs_queries" {
  project = var.project
  role    = "roles/bigquery.jobUser"
  member  = local.map
}

resource "google_bigquery_dataset_iam_member" "map_reads_rows" {
  dataset_id = google_bigquery_dataset.tilestream.dataset_id
  role       = "roles/bigquery.dataViewer"
  member     = local.map
}

# Read the prediction COGs (map tiles), under the output prefix only.
resource "google_storage_bucket_iam_member" "map_reads_output" {
  bucket = google_storage_bucket.tiles.name
  role   = "roles/storage.objectViewer"
  member = local.map
  condition {
    title      = "output-prefix-only"
    expression = "resource.name.startsWith(\"${local.bucket_objects}${var.output_prefix}\")"
  }
}

resource "google_cloud_run_v2_service" "map" {
  count    = var.map_image == "" ? 0 : 1
  name     = "${var.name}-map"
  location = var.region
  ingress  = "INGRESS_TRAFFIC_ALL"
  template {
    service_account = google_service_account.map.email
    scaling {
      max_instance_count = 2
    }
    containers {
      image = var.map_image
      args = ["map", "--host", "0.0.0.0",
        "--bq_dataset", "${var.project}:${google_bigquery_dataset.tilestream.dataset_id}",
      "--output_prefix", "gs://${google_storage_bucket.tiles.name}/${trimsuffix(var.output_prefix, "/")}"]
      env {
        # GDAL's /vsigs/ takes the service account's token from the metadata server.
        name  = "CPL_MACHINE_IS_GCE"
        value = "YES"
      }
      resources {
        limits = { cpu = "1", memory = "1Gi" }
      }
    }
  }
  depends_on = [google_project_service.apis]
}

resource "google_cloud_run_v2_service_iam_member" "map_viewers" {
  for_each = var.map_image == "" ? toset([]) : toset(var.map_viewers)
  name     = google_cloud_run_v2_service.map[0].name
  location = var.region
  role     = "roles/run.invoker"
  member   = each.value
}

output "map_service_account" {
  value = google_service_account.map.email
}
