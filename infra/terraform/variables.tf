variable "resource_group_name" {
  description = "Existing resource group to deploy into."
  type        = string
}

variable "location" {
  description = "Azure region for every resource: one with serverless GPU profiles (T4 and A100)."
  type        = string
  default     = "swedencentral"

  # https://learn.microsoft.com/azure/container-apps/workload-profiles-overview: scale-to-zero
  # serverless GPUs are offered in these regions.
  validation {
    condition     = contains(["swedencentral", "westus3", "australiaeast"], var.location)
    error_message = "location must be a region with serverless GPU profiles: swedencentral, westus3 or australiaeast."
  }
}

variable "name_prefix" {
  description = "Prefix of every resource name: 3-11 lower-case letters and digits."
  type        = string
  default     = "clens"

  validation {
    condition     = can(regex("^[a-z0-9]{3,11}$", var.name_prefix))
    error_message = "name_prefix must be 3-11 lower-case letters and digits."
  }
}

variable "gpu_profile_type" {
  description = "Serverless GPU profile of the GPU job; set when the environment is created (changing it replaces the environment)."
  type        = string
  default     = "Consumption-GPU-NC8as-T4"

  validation {
    condition     = contains(["Consumption-GPU-NC8as-T4", "Consumption-GPU-NC24-A100"], var.gpu_profile_type)
    error_message = "gpu_profile_type must be Consumption-GPU-NC8as-T4 or Consumption-GPU-NC24-A100."
  }
}

variable "job_parallelism" {
  description = "Replicas started per GPU job execution (each one a GPU, billed)."
  type        = number
  default     = 1
}

variable "job_max_executions" {
  description = "Most GPU job executions KEDA runs at once."
  type        = number
  default     = 4
}

variable "cpu_job_max_executions" {
  description = "Most CPU job executions KEDA runs at once."
  type        = number
  default     = 2
}

variable "gpu_job_image" {
  description = "GPU job image (job/Dockerfile, default target) once pushed, e.g. <registry>/clusterlens-job:<tag>; empty runs a placeholder."
  type        = string
  default     = ""
}

variable "cpu_job_image" {
  description = "CPU job image (job/Dockerfile with VARIANT=cpu) once pushed, e.g. <registry>/clusterlens-job-cpu:<tag>; empty runs a placeholder."
  type        = string
  default     = ""
}

variable "blob_events_enabled" {
  description = "Second phase: create the Event Grid subscription, once the function app's code is published and its host has a blobs_extension key."
  type        = bool
  default     = false
}

variable "storage_sku" {
  description = "SKU of the data storage account (tier_replication)."
  type        = string
  default     = "Standard_ZRS"
}

variable "index_share_quota_gb" {
  description = "Quota of the index Azure Files share in GiB: about 10 GB per 10M-image version, times the kept versions (CLUSTERLENS_INDEX_KEEP_VERSIONS), a shared base segment and the one being published. Standard shares bill the bytes stored, not the quota."
  type        = number
  default     = 50

  validation {
    condition     = can(regex("^[1-9][0-9]{0,4}$", tostring(var.index_share_quota_gb)))
    error_message = "index_share_quota_gb must be a whole number of GiB, 1 to 99999 (Azure Files takes up to 102400)."
  }
}

variable "tags" {
  description = "Tags on every resource."
  type        = map(string)
  default = {
    app = "clusterlens"
  }
}

variable "grant_deployer_data_roles" {
  description = "Give whoever runs terraform the data roles the checks in docs/deploy.md need (Storage Blob and Queue Data Contributor on the data account)."
  type        = bool
  default     = true
}
