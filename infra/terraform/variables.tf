variable "resource_group_name" {
  description = "Existing resource group to deploy into."
  type        = string
}

variable "location" {
  description = "Azure region for every resource."
  type        = string
  default     = "westeurope"
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
  description = "Workload profile type of the Container Apps GPU profile the job runs on."
  type        = string
  default     = "Consumption-GPU-NC8as-T4"

  validation {
    condition     = contains(["Consumption-GPU-NC8as-T4", "Consumption-GPU-NC24-A100"], var.gpu_profile_type)
    error_message = "gpu_profile_type must be Consumption-GPU-NC8as-T4 or Consumption-GPU-NC24-A100."
  }
}

variable "job_parallelism" {
  description = "Replicas started per job execution."
  type        = number
  default     = 1
}

variable "job_max_executions" {
  description = "Most job executions KEDA runs at once."
  type        = number
  default     = 4
}

variable "job_image_tag" {
  description = "Tag of the clusterlens-job image in the registry."
  type        = string
  default     = "latest"
}

variable "job_image" {
  description = "Full job image name; empty means <registry login server>/clusterlens-job:<job_image_tag>."
  type        = string
  default     = ""
}

variable "storage_sku" {
  description = "SKU of the data storage account (tier_replication)."
  type        = string
  default     = "Standard_ZRS"
}

variable "tags" {
  description = "Tags on every resource."
  type        = map(string)
  default = {
    app = "clusterlens"
  }
}
