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

  # jobs: reindex, retrain, analyse, ingest_container, dedupe (the CPU job); jobs-gpu: embed, train_head (the GPU job).
  queues = toset(["jobs", "jobs-gpu", "jobs-poison"])

  # Settings shared by the function app and the job (infra/app-settings.json).
  shared_settings = jsondecode(file("${path.module}/../app-settings.json")).settings

  storage_account_url = trimsuffix(azurerm_storage_account.data.primary_blob_endpoint, "/")

  app_insights_authentication_string = "ClientId=${azurerm_user_assigned_identity.main.client_id};Authorization=AAD"

  job_env = merge(local.shared_settings, {
    # Jobs only: where the publisher mirrors each index version (the index share, read-write
    # here); the function app mounts the same share and opens versions from CLUSTERLENS_INDEX_MOUNT.
    CLUSTERLENS_INDEX_SHARE_DIR               = "/mounts/index"
    AZURE_CLIENT_ID                           = azurerm_user_assigned_identity.main.client_id
    CLUSTERLENS_AZURE_STORAGE_ACCOUNT_URL     = local.storage_account_url
    APPLICATIONINSIGHTS_CONNECTION_STRING     = azurerm_application_insights.main.connection_string
    APPLICATIONINSIGHTS_AUTHENTICATION_STRING = local.app_insights_authentication_string
  })

  # A Container Apps job cannot be created with an image that is not in the registry yet
  # (MANIFEST_UNKNOWN), and a new registry is empty: until the images are built and pushed
  # (docs/deploy.md), the jobs run Microsoft's public jobs quickstart image, which exits
  # without touching the queues.
  placeholder_image = "mcr.microsoft.com/k8se/quickstart-jobs:latest"

  # What differs between the two jobs; the key is also the worker's --queues argument.
  jobs = {
    gpu = {
      profile        = "gpu"
      queue          = local.shared_settings.CLUSTERLENS_GPU_QUEUE_NAME
      image          = coalesce(var.gpu_job_image, local.placeholder_image)
      cpu            = local.gpu_resources[var.gpu_profile_type].cpu
      memory         = local.gpu_resources[var.gpu_profile_type].memory
      parallelism    = var.job_parallelism
      max_executions = var.job_max_executions
      env = merge(local.job_env, {
        CLUSTERLENS_ORT_PROVIDERS        = "[\"CUDAExecutionProvider\", \"CPUExecutionProvider\"]"
        CLUSTERLENS_EMBED_DECODE_WORKERS = tostring(local.gpu_resources[var.gpu_profile_type].cpu)
      })
    }
    cpu = {
      profile        = "Consumption"
      queue          = local.shared_settings.CLUSTERLENS_QUEUE_NAME
      image          = coalesce(var.cpu_job_image, local.placeholder_image)
      cpu            = 4
      memory         = "8Gi"
      parallelism    = 1
      max_executions = var.cpu_job_max_executions
      env = merge(local.job_env, {
        CLUSTERLENS_EMBED_DECODE_WORKERS = "4"
      })
    }
  }

  # Container size for the whole GPU workload profile.
  gpu_resources = {
    "Consumption-GPU-NC8as-T4"  = { cpu = 8, memory = "56Gi" }
    "Consumption-GPU-NC24-A100" = { cpu = 24, memory = "220Gi" }
  }
}
