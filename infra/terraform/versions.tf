terraform {
  # 1.11: write-only arguments (azapi's sensitive_body keeps the files account key out of the state of
  # the share mount).
  required_version = ">= 1.11.0"

  # Each pin is the release whose documented arguments tests/test_terraform_args.py checks every .tf file
  # against (tests/data/terraform_provider_args.json): a newer minor of the same major keeps them.
  required_providers {
    azurerm = {
      source  = "hashicorp/azurerm"
      version = "~> 4.81"
    }
    # What azurerm_function_app_flex_consumption has no argument for: the models share mount
    # (sites/config azurestorageaccounts) and the Key Vault reference identity.
    azapi = {
      source  = "Azure/azapi"
      version = "~> 2.12"
    }
    random = {
      source  = "hashicorp/random"
      version = "~> 3.6"
    }
  }
}

provider "azurerm" {
  features {
    storage {
      # The data account has shared keys off. With this off, the storage account resource does not read
      # its queue and static-website properties over the data plane (this tree sets neither), so
      # `terraform plan` needs no data-plane role for whoever runs it; containers, queues and the share
      # are managed through Azure Resource Manager (storage_account_id).
      data_plane_available = false
    }
  }

  storage_use_azuread = true
}

provider "azapi" {}
