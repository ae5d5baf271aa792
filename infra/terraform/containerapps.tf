resource "azurerm_container_registry" "main" {
  #checkov:skip=CKV_AZURE_139:Public registry endpoint on purpose: Container Apps pulls without a VNet; private access needs Premium + private endpoints, outside this VNet-less design. Pushes and pulls need Entra ID (admin user and anonymous pull are off)
  #checkov:skip=CKV_AZURE_163:Basic SKU on purpose (cost); this check only tests for Standard/Premium. Image vulnerability assessment is Microsoft Defender for Containers, a subscription-level plan outside this tree
  #checkov:skip=CKV_AZURE_164:Content trust (signed images) is a Premium-only feature; one image built and pushed by this project's own pipeline
  #checkov:skip=CKV_AZURE_165:Geo-replication is Premium-only; single-region deployment
  #checkov:skip=CKV_AZURE_166:Image quarantine is Premium-only; one first-party image
  #checkov:skip=CKV_AZURE_167:Retention policy for untagged manifests is Premium-only
  #checkov:skip=CKV_AZURE_233:Zone redundancy is Premium-only; the image can be rebuilt and re-pushed from job/Dockerfile
  #checkov:skip=CKV_AZURE_237:Dedicated data endpoints are Premium-only and serve firewall rules, which this VNet-less design does not use
  name                   = "cr${local.name}"
  resource_group_name    = var.resource_group_name
  location               = var.location
  sku                    = "Basic"
  admin_enabled          = false
  anonymous_pull_enabled = false
  tags                   = var.tags
}

resource "azurerm_container_app_environment" "main" {
  name                       = "cae-${local.name}"
  resource_group_name        = var.resource_group_name
  location                   = var.location
  logs_destination           = "log-analytics"
  log_analytics_workspace_id = azurerm_log_analytics_workspace.main.id

  workload_profile {
    name                  = "Consumption"
    workload_profile_type = "Consumption"
  }

  # A GPU profile can only be added when the environment is created: changing
  # gpu_profile_type later replaces the environment (and both jobs).
  workload_profile {
    name                  = "gpu"
    workload_profile_type = var.gpu_profile_type
  }

  tags = var.tags
}

# The shares the jobs mount: models read-only, index read-write (the reindex job mirrors each
# index version there before swapping the blob pointer). The account key goes only here.
resource "azurerm_container_app_environment_storage" "models" {
  name                         = "models"
  container_app_environment_id = azurerm_container_app_environment.main.id
  account_name                 = azurerm_storage_account.files.name
  share_name                   = azurerm_storage_share.models.name
  access_key                   = azurerm_storage_account.files.primary_access_key
  access_mode                  = "ReadOnly"
}

resource "azurerm_container_app_environment_storage" "index" {
  name                         = "index"
  container_app_environment_id = azurerm_container_app_environment.main.id
  account_name                 = azurerm_storage_account.files.name
  share_name                   = azurerm_storage_share.index.name
  access_key                   = azurerm_storage_account.files.primary_access_key
  access_mode                  = "ReadWrite"
}

# Two jobs running `python -m job`, each started by KEDA while its queue has messages
# (azure-queue scaler authenticated with the managed identity): "gpu" on the GPU profile
# takes jobs-gpu (embed, train_head), "cpu" on the Consumption profile takes jobs
# (reindex, retrain, analyse, ingest_container, dedupe), so no GPU is billed for work that cannot use one.
resource "azurerm_container_app_job" "worker" {
  for_each = local.jobs

  name                         = "caj-${local.name}-${each.key}"
  resource_group_name          = var.resource_group_name
  location                     = var.location
  container_app_environment_id = azurerm_container_app_environment.main.id
  workload_profile_name        = each.value.profile

  replica_timeout_in_seconds = 7200
  replica_retry_limit        = 1

  identity {
    type         = "UserAssigned"
    identity_ids = [azurerm_user_assigned_identity.main.id]
  }

  registry {
    server   = azurerm_container_registry.main.login_server
    identity = azurerm_user_assigned_identity.main.id
  }

  event_trigger_config {
    parallelism = each.value.parallelism
    # Every replica works the queue until it is empty, then exits; the execution is
    # complete when all of them are (with 1, the first replica to exit would end the
    # execution and stop the others in the middle of a message).
    replica_completion_count = each.value.parallelism

    scale {
      min_executions              = 0
      max_executions              = each.value.max_executions
      polling_interval_in_seconds = 30

      rules {
        name             = "queue"
        custom_rule_type = "azure-queue"
        metadata = {
          accountName = azurerm_storage_account.data.name
          queueName   = each.value.queue
          queueLength = "1"
        }
        identity_id = azurerm_user_assigned_identity.main.id
      }
    }
  }

  template {
    container {
      name   = "worker"
      image  = each.value.image
      args   = ["--queues", each.key]
      cpu    = each.value.cpu
      memory = each.value.memory

      dynamic "env" {
        for_each = each.value.env
        content {
          name  = env.key
          value = env.value
        }
      }

      volume_mounts {
        name = "models"
        path = "/mounts/models"
      }

      volume_mounts {
        name = "index"
        path = "/mounts/index"
      }
    }

    volume {
      name         = "models"
      storage_type = "AzureFile"
      storage_name = azurerm_container_app_environment_storage.models.name
    }

    volume {
      name         = "index"
      storage_type = "AzureFile"
      storage_name = azurerm_container_app_environment_storage.index.name
    }
  }

  tags = var.tags

  depends_on = [azurerm_role_assignment.identity, azurerm_storage_queue.data]
}
