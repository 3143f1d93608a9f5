# The automatic rollback rule in production: `tilestream model watch` (pipeline/ops/watch.py) as
# a Cloud Run job, run every few minutes by Cloud Scheduler, with an identity of its own. It
# reads the stream's rows in BigQuery and, when a candidate fails the rule, writes the rollback
# to channels.json with a compare-and-swap; the stream follows channels.json by itself
# (docs/operations.md, "The automatic rollback rule"). Why a job beside the stream rather than a
# step inside it: the rule compares versions over hours of rows that BigQuery already holds,
# and the workers then need no write access to the registry.

variable "rollback_image" {
  description = "Image of the rollback job: the TileStream CPU image (templates/Dockerfile.cpu)"
  type        = string
  default     = ""
}

variable "rollback_schedule" {
  description = "How often the rollback rule judges the candidate (cron, UTC)"
  type        = string
  default     = "*/10 * * * *"
}

resource "google_service_account" "rollback" {
  account_id   = "${var.name}-rollback"
  display_name = "TileStream automatic rollback rule (Cloud Run job)"
}

locals {
  rollback = "serviceAccount:${google_service_account.rollback.email}"
}

# Query the stream's tables: jobs in the project, reads in the one dataset.
resource "google_project_iam_member" "rollback_runs_queries" {
  project = var.project
  role    = "roles/bigquery.jobUser"
  member  = local.rollback
}

resource "google_bigquery_dataset_iam_member" "rollback_reads_rows" {
  dataset_id = google_bigquery_dataset.tilestream.dataset_id
  role       = "roles/bigquery.dataViewer"
  member     = local.rollback
}

# Read the versions and replace channels.json (a compare-and-swap overwrite needs create, get
# and delete), under the registry prefix only.
resource "google_storage_bucket_iam_member" "rollback_writes_channels" {
  bucket = google_storage_bucket.models.name
  role   = "roles/storage.objectUser"
  member = local.rollback
  condition {
    title      = "registry-prefix-only"
    expression = "resource.name.startsWith(\"${local.registry_objects}\")"
  }
}

resource "google_cloud_run_v2_job" "rollback_rule" {
  name     = "${var.name}-rollback-rule"
  location = var.region
  template {
    template {
      service_account = google_service_account.rollback.email
      max_retries     = 1
      timeout         = "300s"
      containers {
        image   = var.rollback_image
        command = ["tilestream"]
        args = ["model", "watch", "--registry",
          "gs://${google_storage_bucket.models.name}/${trimsuffix(var.registry_prefix, "/")}",
        "--bq_dataset", "${var.project}:${google_bigquery_dataset.tilestream.dataset_id}"]
      }
    }
  }
  depends_on = [google_project_service.apis]
}

# Cloud Scheduler starts the job as the job's own identity.
resource "google_cloud_run_v2_job_iam_member" "rollback_runs_itself" {
  name     = google_cloud_run_v2_job.rollback_rule.name
  location = var.region
  role     = "roles/run.invoker"
  member   = local.rollback
}

resource "google_cloud_scheduler_job" "rollback_rule" {
  name     = "${var.name}-rollback-rule"
  region   = var.region
  schedule = var.rollback_schedule
  http_target {
    http_method = "POST"
    uri         = "https://run.googleapis.com/v2/projects/${var.project}/locations/${var.region}/jobs/${google_cloud_run_v2_job.rollback_rule.name}:run"
    oauth_token {
      service_account_email = google_service_account.rollback.email
    }
  }
}
