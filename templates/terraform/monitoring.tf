# SLO alerting and the dashboard (docs/operations.md states the SLOs and the budget policy).
#
# Multi-window, multi-burn-rate alerts on the counters the stream exports through Dataflow
# (dataflow.googleapis.com/job/user_counter, label metric_name; transforms/slis.py and
# transforms/deadletter.py emit them). A policy fires when the bad-event ratio exceeds
# burn * (1 - target) over BOTH its long and its short window: the long window proves the budget
# is really burning, the short one that it still is (so the alert clears soon after a fix).
#   fast: burn 14.4 over 1h and 5m  -> 2 % of a 28-day budget in an hour   (page)
#   slow: burn 6    over 6h and 30m -> 5 % of a 28-day budget in six hours (ticket)

variable "slo_latency_target" {
  description = "Share of tiles whose row lands within the latency threshold (transforms/slis.py)"
  type        = number
  default     = 0.95
}

variable "slo_error_target" {
  description = "Share of messages that are not dead-lettered"
  type        = number
  default     = 0.995
}

variable "slo_freshness_s" {
  description = "Alert when the stream's data watermark is older than this"
  type        = number
  default     = 900
}

variable "notification_channels" {
  description = "Cloud Monitoring notification channel ids for the alerts"
  type        = list(string)
  default     = []
}

locals {
  job     = "monitored_resource=\"dataflow_job\",job_name=~\"${var.name}.*\""
  counter = "dataflow_googleapis_com:job_user_counter"
}

resource "google_monitoring_alert_policy" "latency_fast_burn" {
  display_name          = "TileStream latency SLO: fast burn (page)"
  combiner              = "OR"
  notification_channels = var.notification_channels
  severity              = "CRITICAL"
  conditions {
    display_name = "slow-tile ratio > 14.4x budget over 1h and 5m"
    condition_prometheus_query_language {
      query    = <<-EOT
        (sum(increase(${local.counter}{${local.job},metric_name="slo_tiles_slow"}[1h]))
          / sum(increase(${local.counter}{${local.job},metric_name="slo_tiles_total"}[1h]))
          > 14.4 * (1 - ${var.slo_latency_target}))
        and
        (sum(increase(${local.counter}{${local.job},metric_name="slo_tiles_slow"}[5m]))
          / sum(increase(${local.counter}{${local.job},metric_name="slo_tiles_total"}[5m]))
          > 14.4 * (1 - ${var.slo_latency_target}))
      EOT
      duration = "0s"
    }
  }
  documentation {
    content   = "2 % of the 28-day latency error budget burns per hour. docs/operations.md: error budget policy; `tilestream slo --window 1h`."
    mime_type = "text/markdown"
  }
}

resource "google_monitoring_alert_policy" "latency_slow_burn" {
  display_name          = "TileStream latency SLO: slow burn (ticket)"
  combiner              = "OR"
  notification_channels = var.notification_channels
  severity              = "WARNING"
  conditions {
    display_name = "slow-tile ratio > 6x budget over 6h and 30m"
    condition_prometheus_query_language {
      query    = <<-EOT
        (sum(increase(${local.counter}{${local.job},metric_name="slo_tiles_slow"}[6h]))
          / sum(increase(${local.counter}{${local.job},metric_name="slo_tiles_total"}[6h]))
          > 6 * (1 - ${var.slo_latency_target}))
        and
        (sum(increase(${local.counter}{${local.job},metric_name="slo_tiles_slow"}[30m]))
          / sum(increase(${local.counter}{${local.job},metric_name="slo_tiles_total"}[30m]))
          > 6 * (1 - ${var.slo_latency_target}))
      EOT
      duration = "0s"
    }
  }
  documentation {
    content   = "5 % of the 28-day latency error budget burns in six hours. `tilestream slo --window 6h`."
    mime_type = "text/markdown"
  }
}

resource "google_monitoring_alert_policy" "errors_fast_burn" {
  display_name          = "TileStream error-ratio SLO: fast burn (page)"
  combiner              = "OR"
  notification_channels = var.notification_channels
  severity              = "CRITICAL"
  conditions {
    display_name = "dead letters per message > 14.4x budget over 1h and 5m"
    condition_prometheus_query_language {
      query    = <<-EOT
        (sum(increase(${local.counter}{${local.job},metric_name="dead_letters"}[1h]))
          / sum(increase(${local.counter}{${local.job},metric_name="messages_in"}[1h]))
          > 14.4 * (1 - ${var.slo_error_target}))
        and
        (sum(increase(${local.counter}{${local.job},metric_name="dead_letters"}[5m]))
          / sum(increase(${local.counter}{${local.job},metric_name="messages_in"}[5m]))
          > 14.4 * (1 - ${var.slo_error_target}))
      EOT
      duration = "0s"
    }
  }
  documentation {
    content   = "Dead letters burn 2 % of the 28-day error budget per hour. Read `dead_letters_by_stage` (pipeline/ops/sql/queries.sql)."
    mime_type = "text/markdown"
  }
}

resource "google_monitoring_alert_policy" "errors_slow_burn" {
  display_name          = "TileStream error-ratio SLO: slow burn (ticket)"
  combiner              = "OR"
  notification_channels = var.notification_channels
  severity              = "WARNING"
  conditions {
    display_name = "dead letters per message > 6x budget over 6h and 30m"
    condition_prometheus_query_language {
      query    = <<-EOT
        (sum(increase(${local.counter}{${local.job},metric_name="dead_letters"}[6h]))
          / sum(increase(${local.counter}{${local.job},metric_name="messages_in"}[6h]))
          > 6 * (1 - ${var.slo_error_target}))
        and
        (sum(increase(${local.counter}{${local.job},metric_name="dead_letters"}[30m]))
          / sum(increase(${local.counter}{${local.job},metric_name="messages_in"}[30m]))
          > 6 * (1 - ${var.slo_error_target}))
      EOT
      duration = "0s"
    }
  }
  documentation {
    content   = "Dead letters burn 5 % of the 28-day error budget in six hours."
    mime_type = "text/markdown"
  }
}

# Freshness: Dataflow's own data watermark age (how far behind the oldest unprocessed message is).
resource "google_monitoring_alert_policy" "freshness" {
  display_name          = "TileStream freshness: watermark older than ${var.slo_freshness_s}s"
  combiner              = "OR"
  notification_channels = var.notification_channels
  severity              = "CRITICAL"
  conditions {
    display_name = "data watermark age"
    condition_prometheus_query_language {
      query    = "max(dataflow_googleapis_com:job_data_watermark_age{${local.job}}) > ${var.slo_freshness_s}"
      duration = "600s"
    }
  }
}

resource "google_monitoring_dashboard" "tilestream" {
  dashboard_json = replace(file("${path.module}/dashboard.json"), "$${JOB_PREFIX}", var.name)
}
