terraform {
  required_version = ">= 1.6.0"

  required_providers {
    # 4.x: azurerm_function_app_flex_consumption and identity_id on Container Apps job
    # scale rules (KEDA workload identity) need a recent 4.x release.
    azurerm = {
      source  = "hashicorp/azurerm"
      version = "~> 4.0"
    }
    random = {
      source  = "hashicorp/random"
      version = "~> 3.6"
    }
  }
}

provider "azurerm" {
  features {}

  # The data account has shared-key access disabled: data-plane calls made by the
  # provider (containers, queues) must use Entra ID.
  storage_use_azuread = true
}
