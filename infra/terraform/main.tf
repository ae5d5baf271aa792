# Names are "${name_prefix}${suffix}"; the suffix plays the part of Bicep's
# substring(uniqueString(resourceGroup().id), 0, 6).
resource "random_string" "suffix" {
  length  = 6
  lower   = true
  upper   = false
  numeric = true
  special = false
}

locals {
  name = "${var.name_prefix}${random_string.suffix.result}"

  storage_tier        = split("_", var.storage_sku)[0]
  storage_replication = split("_", var.storage_sku)[1]

  # Private blob containers of the data account; "deployments" holds the Flex
  # Consumption deployment package.
  blob_containers = toset([
    "uploads",
    "embeddings",
    "index",
    "labels",
    "quarantine",
    "reports",
    "models",
    "jobs",
    "deployments",
  ])

  queues = toset(["jobs", "jobs-poison"])

  # Settings shared by the function app and the job (infra/app-settings.json).
  shared_settings = jsondecode(file("${path.module}/../app-settings.json")).settings

  storage_account_url = trimsuffix(azurerm_storage_account.data.primary_blob_endpoint, "/")

  app_insights_authentication_string = "ClientId=${azurerm_user_assigned_identity.main.client_id};Authorization=AAD"

  job_env = merge(local.shared_settings, {
    AZURE_CLIENT_ID                           = azurerm_user_assigned_identity.main.client_id
    CLUSTERLENS_AZURE_STORAGE_ACCOUNT_URL     = local.storage_account_url
    APPLICATIONINSIGHTS_CONNECTION_STRING     = azurerm_application_insights.main.connection_string
    APPLICATIONINSIGHTS_AUTHENTICATION_STRING = local.app_insights_authentication_string
    CLUSTERLENS_ORT_PROVIDERS                 = "[\"CUDAExecutionProvider\", \"CPUExecutionProvider\"]"
  })

  # job_image, or <registry login server>/clusterlens-job:<job_image_tag> when empty.
  job_image = coalesce(var.job_image, "${azurerm_container_registry.main.login_server}/clusterlens-job:${var.job_image_tag}")

  # Container size for the whole GPU workload profile.
  gpu_resources = {
    "Consumption-GPU-NC8as-T4"  = { cpu = 8, memory = "56Gi" }
    "Consumption-GPU-NC24-A100" = { cpu = 24, memory = "220Gi" }
  }
}
