# The model registry: versioned model directories and the channels document under one prefix of
# a bucket of its own (`tilestream model publish|promote|canary|shadow|rollback --registry
# gs://<bucket>/<prefix>`). Operators change it; the workers only ever read it.

variable "registry_prefix" {
  description = "Object prefix of the model registry (model directories + channels.json)"
  type        = string
  default     = "registry/"
}

variable "model_operators" {
  description = "Members (e.g. group:ml-ops@example.com) who publish, promote and roll back"
  type        = list(string)
  default     = []
}

resource "google_storage_bucket" "models" {
  #checkov:skip=CKV_GCP_62:every generation is kept (versioning) and the channels document records who promoted what; Cloud Audit Logs record the rest (docs/deploy.md)
  name                        = "${var.project}-${var.name}-models"
  location                    = var.region
  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"
  # Every channels.json generation stays recoverable, beside the document's own history.
  versioning {
    enabled = true
  }
}

locals {
  models_bucket    = "projects/_/buckets/${google_storage_bucket.models.name}"
  registry_objects = "${local.models_bucket}/objects/${var.registry_prefix}"
}

# Workers read cards, weights and channels.json through roles/dataflow.worker (main.tf), which
# reads every object of the project: a grant here would restrict nothing.

# Operators write the registry (publish is create-only by generation precondition in the CLI;
# channels changes are compare-and-swap on the generation) and list its versions: a listing is
# checked against the bucket itself, so the bucket is named beside the prefix.
resource "google_storage_bucket_iam_member" "operators_manage_registry" {
  for_each = toset(var.model_operators)
  bucket   = google_storage_bucket.models.name
  role     = "roles/storage.objectUser"
  member   = each.value
  condition {
    title      = "registry-prefix-only"
    expression = "resource.name.startsWith(\"${local.registry_objects}\") || resource.name == \"${local.models_bucket}\""
  }
}

output "registry" {
  value = "gs://${google_storage_bucket.models.name}/${trimsuffix(var.registry_prefix, "/")}"
}
