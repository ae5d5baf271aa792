// Two storage accounts:
// - data (st<name>): blobs + the jobs queues, Entra ID only (shared-key access off).
// - files (stf<name>): the Azure Files shares `models` (mounted read-only by the Function App and the jobs) and
//   `index` (published index versions: written by the jobs, opened in place by the Function App).
//   Azure Files mounts in Function Apps and Container Apps authenticate with the account key, so this
//   account alone keeps shared-key access on.

param dataAccountName string

param filesAccountName string

param location string

param tags object

@description('Replication SKU of both accounts.')
param storageSku string

@description('Quota of the `index` share in GiB.')
param indexShareQuotaGb int

@description('Log Analytics workspace that receives the blob and queue service logs.')
param workspaceId string

@description('Resource id of the user-assigned identity (role assignment names).')
param identityId string

@description('Principal id of the user-assigned identity (role assignments).')
param identityPrincipalId string

@description('Object id of the deploying principal; empty grants it nothing.')
param deployerPrincipalId string = ''

@description('Kind of deployerPrincipalId: User, ServicePrincipal or Group.')
param deployerPrincipalType string = 'User'

// Roles of the identity here (names guid(scope, identity, role)). Blob Data Owner covers the app data, the
// Flex deployment package and Event Grid dead-lettering; Queue Data Contributor covers send/receive/delete
// and the KEDA scalers' queue-length reads. The models and index shares need no role: Azure Files mounts use the
// files account's key.
var storageBlobDataOwner = 'b7e6dc6d-f1e8-4753-8033-0f276bb0955b'
var storageQueueDataContributor = '974c5e8b-45b9-4653-ba55-5f855dd0fb88'
// The deploying principal's data roles (shared keys are off on the data account, so `az storage ...
// --auth-mode login` needs them): upload a test image and read the queues (docs/deploy.md "Check it").
// The models go onto the share with the files account's key, which Contributor can list.
var storageBlobDataContributor = 'ba92f5b4-2d11-453d-a403-e96b0029c9fe'

var blobContainers = [
  'uploads'
  'embeddings'
  'index'
  'labels'
  'quarantine'
  'reports'
  'models'
  'jobs'
  'deployments' // the Flex Consumption deployment package container
]

var queues = [
  'jobs' // reindex, retrain, analyse, ingest_container, dedupe: the CPU job
  'jobs-gpu' // embed, train_head: the GPU job
  'jobs-poison'
]

var storageLogCategories = [
  'StorageRead'
  'StorageWrite'
  'StorageDelete'
]

resource dataAccount 'Microsoft.Storage/storageAccounts@2023-05-01' = {
  // checkov:skip=CKV_AZURE_35:Serverless design without a VNet (Flex Consumption without VNet integration, Container Apps environment without a VNet, Event Grid dead-lettering): the default network action stays Allow; shared keys are disabled, so every request needs an Entra ID token and an RBAC role.
  // checkov:skip=CKV_AZURE_59:Public network access is needed by the same VNet-less serverless design (no private endpoints); access is Entra ID only (allowSharedKeyAccess false).
  // checkov:skip=CKV_AZURE_206:Zone-redundant (Standard_ZRS) by design: the data is re-creatable (uploads can be re-sent, embeddings and index rebuilt); set storageSku to Standard_GZRS where geo-redundancy is required.
  // checkov:skip=CKV_AZURE_43:The name is built in main.bicep as 'st' + namePrefix (3-11 lower-case letters/digits) + 6 characters of uniqueString(), i.e. always 11-19 lower-case alphanumerics; checkov cannot evaluate a module parameter.
  name: dataAccountName
  location: location
  tags: tags
  kind: 'StorageV2'
  sku: {
    name: storageSku
  }
  properties: {
    accessTier: 'Hot'
    supportsHttpsTrafficOnly: true
    minimumTlsVersion: 'TLS1_2'
    allowBlobPublicAccess: false
    allowSharedKeyAccess: false
    defaultToOAuthAuthentication: true
    publicNetworkAccess: 'Enabled'
    networkAcls: {
      defaultAction: 'Allow'
      bypass: 'AzureServices'
    }
  }
}

resource blobService 'Microsoft.Storage/storageAccounts/blobServices@2023-05-01' = {
  parent: dataAccount
  name: 'default'
  properties: {
    deleteRetentionPolicy: {
      enabled: true
      days: 7
    }
    containerDeleteRetentionPolicy: {
      enabled: true
      days: 7
    }
    isVersioningEnabled: true
  }
}

resource containers 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' = [for container in blobContainers: {
  parent: blobService
  name: container
  properties: {
    publicAccess: 'None'
  }
}]

resource queueService 'Microsoft.Storage/storageAccounts/queueServices@2023-05-01' = {
  parent: dataAccount
  name: 'default'
}

resource storageQueues 'Microsoft.Storage/storageAccounts/queueServices/queues@2023-05-01' = [for queue in queues: {
  parent: queueService
  name: queue
}]

resource blobDiagnostics 'Microsoft.Insights/diagnosticSettings@2021-05-01-preview' = {
  name: 'blob-to-log-analytics'
  scope: blobService
  properties: {
    workspaceId: workspaceId
    logs: [for category in storageLogCategories: {
      category: category
      enabled: true
    }]
    metrics: [
      {
        category: 'Transaction'
        enabled: true
      }
    ]
  }
}

resource queueDiagnostics 'Microsoft.Insights/diagnosticSettings@2021-05-01-preview' = {
  name: 'queue-to-log-analytics'
  scope: queueService
  properties: {
    workspaceId: workspaceId
    logs: [for category in storageLogCategories: {
      category: category
      enabled: true
    }]
    metrics: [
      {
        category: 'Transaction'
        enabled: true
      }
    ]
  }
}

resource filesAccount 'Microsoft.Storage/storageAccounts@2023-05-01' = {
  // checkov:skip=CKV_AZURE_35:Serverless design without a VNet: the Flex Consumption app and the Container Apps environment mount the share over the account's public endpoint.
  // checkov:skip=CKV_AZURE_59:Public network access is needed for the Azure Files mounts of the VNet-less Flex Consumption app and Container Apps environment (no private endpoints).
  // checkov:skip=CKV_AZURE_206:Zone-redundant (Standard_ZRS) by design: the shares only hold model files (re-creatable from the packaged weights) and copies of index versions that are kept in the data account's blobs; set storageSku to Standard_GZRS where geo-redundancy is required.
  // checkov:skip=CKV_AZURE_43:The name is built in main.bicep as 'stf' + namePrefix (3-11 lower-case letters/digits) + 6 characters of uniqueString(), i.e. always 12-20 lower-case alphanumerics; checkov cannot evaluate a module parameter.
  name: filesAccountName
  location: location
  tags: tags
  kind: 'StorageV2'
  sku: {
    name: storageSku
  }
  properties: {
    accessTier: 'Hot'
    supportsHttpsTrafficOnly: true
    minimumTlsVersion: 'TLS1_2'
    allowBlobPublicAccess: false
    // Azure Files mounts (Function App azureStorageAccounts, Container Apps environment storage) use the key.
    allowSharedKeyAccess: true
    publicNetworkAccess: 'Enabled'
    networkAcls: {
      defaultAction: 'Allow'
      bypass: 'AzureServices'
    }
  }
}

resource fileService 'Microsoft.Storage/storageAccounts/fileServices@2023-05-01' = {
  parent: filesAccount
  name: 'default'
}

resource modelsShare 'Microsoft.Storage/storageAccounts/fileServices/shares@2023-05-01' = {
  parent: fileService
  name: 'models'
  properties: {
    shareQuota: 10
  }
}

// Published index versions (index/<version>/...), mirrored here by the reindex job before it swaps the blob
// pointer, so the function app opens them from /mounts/index instead of downloading them (issue 22).
resource indexShare 'Microsoft.Storage/storageAccounts/fileServices/shares@2023-05-01' = {
  parent: fileService
  name: 'index'
  properties: {
    shareQuota: indexShareQuotaGb
  }
}

resource blobDataOwner 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(dataAccount.id, identityId, storageBlobDataOwner)
  scope: dataAccount
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', storageBlobDataOwner)
    principalId: identityPrincipalId
    principalType: 'ServicePrincipal'
  }
}

resource queueDataContributor 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(dataAccount.id, identityId, storageQueueDataContributor)
  scope: dataAccount
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', storageQueueDataContributor)
    principalId: identityPrincipalId
    principalType: 'ServicePrincipal'
  }
}

var deployerDataRoles = empty(deployerPrincipalId) ? [] : [
  storageBlobDataContributor
  storageQueueDataContributor
]

resource deployerData 'Microsoft.Authorization/roleAssignments@2022-04-01' = [for role in deployerDataRoles: {
  name: guid(dataAccount.id, deployerPrincipalId, role)
  scope: dataAccount
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', role)
    principalId: deployerPrincipalId
    principalType: deployerPrincipalType
  }
}]

output dataAccountId string = dataAccount.id
output dataAccountName string = dataAccount.name
output blobEndpoint string = dataAccount.properties.primaryEndpoints.blob
output filesAccountId string = filesAccount.id
output filesAccountName string = filesAccount.name
output modelsShareName string = modelsShare.name
output indexShareName string = indexShare.name
