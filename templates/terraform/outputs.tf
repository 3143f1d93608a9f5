output "subscription" {
  value = google_pubsub_subscription.tiles.id
}

output "results_topic" {
  description = "--results_topic: the stream's result events (docs/results.md)."
  value       = google_pubsub_topic.results.id
}

output "bq_dataset" {
  value = "${var.project}:${google_bigquery_dataset.tilestream.dataset_id}"
}

output "tiles_bucket" {
  value = google_storage_bucket.tiles.name
}

output "input_buckets" {
  description = "The stream's input allow-list: where the bucket notification points."
  value       = "gs://${google_storage_bucket.tiles.name}/${var.input_prefix}"
}

output "output_prefix" {
  value = "gs://${google_storage_bucket.tiles.name}/${var.output_prefix}"
}

output "dataflow_bucket" {
  value = google_storage_bucket.dataflow.name
}

output "image_repository" {
  value = "${var.region}-docker.pkg.dev/${var.project}/${google_artifact_registry_repository.images.repository_id}"
}

output "worker_service_account" {
  value = google_service_account.worker.email
}
