// Flex Consumption plan + Function App (Python 3.11). Storage, queues and Application Insights are reached
// with the user-assigned identity; the only key here is the files account key, used solely by the
// Azure Files mounts of the `models` and `index` shares.

param planName string

param functionAppName string

param location string

param tags object

@description('Resource id of the user-assigned identity.')
param identityId string

@description('Client id of the user-assigned identity.')
param identityClientId string

@description('Data storage account (blobs, queues, the `deployments` container).')
param dataAccountName string

@description('Primary blob endpoint of the data account (https://<account>.blob.core.windows.net/).')
param blobEndpoint string

@description('Files storage account holding the `models` and `index` shares.')
param filesAccountName string

@description('Application Insights connection string (Entra ID ingestion: local auth is disabled).')
param appInsightsConnectionString string

// Every setting of infra/app-settings.json (shared with infra/terraform), plus the deployment-specific,
// identity-based ones. No keys, no connection strings with keys.
var appSettings = union(loadJsonContent('../app-settings.json').settings, {
  AzureWebJobsStorage__accountName: dataAccountName
  AzureWebJobsStorage__credential: 'managedidentity'
  AzureWebJobsStorage__clientId: identityClientId
  AzureWebJobsFeatureFlags: 'EnableWorkerIndexing'
  AZURE_CLIENT_ID: identityClientId
  CLUSTERLENS_AZURE_STORAGE_ACCOUNT_URL: blobEndpoint
  APPLICATIONINSIGHTS_CONNECTION_STRING: appInsightsConnectionString
  APPLICATIONINSIGHTS_AUTHENTICATION_STRING: 'ClientId=${identityClientId};Authorization=AAD'
})

resource plan 'Microsoft.Web/serverfarms@2024-04-01' = {
  // checkov:skip=CKV_AZURE_225:Zone redundancy for Flex Consumption plans is offered only in some regions and location is a parameter here; set properties.zoneRedundant on this plan where the chosen region supports it.
  name: planName
  location: location
  tags: tags
  kind: 'functionapp'
  sku: {
    name: 'FC1'
    tier: 'FlexConsumption'
  }
  properties: {
    reserved: true // Linux
  }
}

resource functionApp 'Microsoft.Web/sites@2024-04-01' = {
  // checkov:skip=CKV_AZURE_222:The app serves the public search page and HTTP API and receives Event Grid webhook deliveries; the design has no VNet or private endpoints, so public network access stays on.
  // checkov:skip=CKV_AZURE_17:Client certificates would block browsers using the page and Event Grid's webhook delivery (which authenticates with the blobs_extension system key instead).
  // checkov:skip=CKV_AZURE_212:numberOfWorkers is a Dedicated/Premium setting; Flex Consumption instances are set by functionAppConfig.scaleAndConcurrency (scale from zero up to 40 instances).
  // checkov:skip=CKV_AZURE_78:Flex Consumption rejects siteConfig.ftpsState (ARM error 51021) and has no FTP deployment endpoint: code is deployed from the deployments blob container (functionAppConfig.deployment), so there is nothing to disable.
  // checkov:skip=CKV_AZURE_213:App Service health check (instance replacement) is available for Functions only on Premium and Dedicated plans, not on Flex Consumption.
  name: functionAppName
  location: location
  // azd finds the app to deploy the `api` service to by this tag.
  tags: union(tags, { 'azd-service-name': 'api' })
  kind: 'functionapp,linux'
  identity: {
    type: 'UserAssigned'
    userAssignedIdentities: {
      '${identityId}': {}
    }
  }
  properties: {
    serverFarmId: plan.id
    httpsOnly: true
    keyVaultReferenceIdentity: identityId
    functionAppConfig: {
      deployment: {
        storage: {
          type: 'blobContainer'
          value: '${blobEndpoint}deployments'
          authentication: {
            type: 'UserAssignedIdentity'
            userAssignedIdentityResourceId: identityId
          }
        }
      }
      scaleAndConcurrency: {
        maximumInstanceCount: 40
        instanceMemoryMB: 2048
      }
      runtime: {
        name: 'python'
        version: '3.11'
      }
    }
    siteConfig: {
      minTlsVersion: '1.2'
      // No ftpsState and no linuxFxVersion: Flex Consumption rejects both (ARM error 51021, "FtpsState ...
      // for Flex Consumption sites is invalid"); the runtime is functionAppConfig.runtime.
      http20Enabled: true
      appSettings: [for setting in items(appSettings): {
        name: setting.key
        value: setting.value
      }]
      // Two Azure Files shares: `models` at /mounts/models, CLUSTERLENS_MODEL_DIR, and `index` at /mounts/index,
      // CLUSTERLENS_INDEX_MOUNT: published index versions, opened in place instead of downloaded. Azure Files
      // mounts authenticate with the account key; the key goes here only, never into app settings or outputs.
      // Read-only and mount-path rules: see the comment on the `index` entry.
      azureStorageAccounts: {
        models: {
          type: 'AzureFiles'
          accountName: filesAccountName
          shareName: 'models'
          mountPath: '/mounts/models'
          protocol: 'Smb'
          accessKey: listKeys(resourceId('Microsoft.Storage/storageAccounts', filesAccountName), '2023-05-01').keys[0].value
        }
        // App Service storage mounts have no read-only flag for Azure Files (only Azure Blob mounts are
        // read-only, and they need a key on the data account, whose keys are off); the app only reads it.
        // Mount paths must not be /, /home or /tmp; an app takes at most five mounts.
        index: {
          type: 'AzureFiles'
          accountName: filesAccountName
          shareName: 'index'
          mountPath: '/mounts/index'
          protocol: 'Smb'
          accessKey: listKeys(resourceId('Microsoft.Storage/storageAccounts', filesAccountName), '2023-05-01').keys[0].value
        }
      }
    }
  }
}

output id string = functionApp.id
output name string = functionApp.name
output defaultHostName string = functionApp.properties.defaultHostName
