variable "project" {
  description = "GCP project id"
  type        = string
}

variable "region" {
  description = "Region for Dataflow, Artifact Registry and the buckets"
  type        = string
  default     = "us-central1"
}

variable "name" {
  description = "Prefix of every resource name"
  type        = string
  default     = "tilestream"
}

variable "input_prefix" {
  description = "Object prefix that new tiles land under; only these notify the stream"
  type        = string
  default     = "incoming/"
}

variable "output_prefix" {
  description = "Object prefix for prediction COGs and dead-letter JSON lines"
  type        = string
  default     = "output/"
}

variable "dataset" {
  description = "BigQuery dataset id"
  type        = string
  default     = "tilestream"
}
