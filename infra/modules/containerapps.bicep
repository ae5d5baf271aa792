// Container Apps environment (Consumption + serverless GPU workload profiles) and the event-triggered
// job that runs `python -m job` while the `jobs` queue has messages (KEDA azure-queue scaler, authenticated
// with the user-assigned identity: no connection string).

param environmentName string

param jobName string

param location string

param tags object

param identityId string

param identityClientId string

param workspaceName string

@description('Application Insights connection string (Entra ID ingestion: local auth is disabled).')
param appInsightsConnectionString string

param dataAccountName string

@description('Primary blob endpoint of the data account (https://<account>.blob.core.windows.net/).')
param blobEndpoint string

param filesAccountName string

param registryLoginServer string

@description('Full job image name in the registry.')
param jobImage string

@allowed([
  'Consumption-GPU-NC8as-T4'
  'Consumption-GPU-NC24-A100'
])
param gpuProfileType string

param jobParallelism int

param jobMaxExecutions int

resource workspace 'Microsoft.OperationalInsights/workspaces@2023-09-01' existing = {
  name: workspaceName
}

// A whole serverless GPU: NC8as-T4 gives 8 vCPU / 56 GiB, NC24-A100 24 vCPU / 220 GiB.
var isA100 = gpuProfileType == 'Consumption-GPU-NC24-A100'
var workerCpu = isA100 ? 24 : 8
var workerMemory = isA100 ? '220Gi' : '56Gi'

// The job's environment: the settings of infra/app-settings.json (the timer schedules are unused but
// harmless), the identity-based storage URL, and the GPU execution provider first.
var sharedSettings = loadJsonContent('../app-settings.json').settings
var jobSettings = union(sharedSettings, {
  AZURE_CLIENT_ID: identityClientId
  CLUSTERLENS_AZURE_STORAGE_ACCOUNT_URL: blobEndpoint
  APPLICATIONINSIGHTS_CONNECTION_STRING: appInsightsConnectionString
  CLUSTERLENS_ORT_PROVIDERS: '["CUDAExecutionProvider", "CPUExecutionProvider"]'
})

resource managedEnvironment 'Microsoft.App/managedEnvironments@2025-01-01' = {
  name: environmentName
  location: location
  tags: tags
  properties: {
    appLogsConfiguration: {
      destination: 'log-analytics'
      logAnalyticsConfiguration: {
        customerId: workspace.properties.customerId
        sharedKey: workspace.listKeys().primarySharedKey
      }
    }
    workloadProfiles: [
      {
        name: 'Consumption'
        workloadProfileType: 'Consumption'
      }
      {
        name: 'gpu'
        workloadProfileType: gpuProfileType
      }
    ]
  }
}

// The `models` Azure Files share, read-only. Environment storage mounts authenticate with the account key;
// the key goes here only.
resource modelsStorage 'Microsoft.App/managedEnvironments/storages@2025-01-01' = {
  parent: managedEnvironment
  name: 'models'
  properties: {
    azureFile: {
      accountName: filesAccountName
      accountKey: listKeys(resourceId('Microsoft.Storage/storageAccounts', filesAccountName), '2023-05-01').keys[0].value
      shareName: 'models'
      accessMode: 'ReadOnly'
    }
  }
}

resource job 'Microsoft.App/jobs@2025-01-01' = {
  name: jobName
  location: location
  tags: tags
  identity: {
    type: 'UserAssigned'
    userAssignedIdentities: {
      '${identityId}': {}
    }
  }
  properties: {
    environmentId: managedEnvironment.id
    workloadProfileName: 'gpu'
    configuration: {
      triggerType: 'Event'
      replicaTimeout: 7200
      replicaRetryLimit: 1
      registries: [
        {
          server: registryLoginServer
          identity: identityId
        }
      ]
      eventTriggerConfig: {
        parallelism: jobParallelism
        replicaCompletionCount: 1
        scale: {
          minExecutions: 0
          maxExecutions: jobMaxExecutions
          pollingInterval: 30
          rules: [
            {
              name: 'jobs-queue'
              type: 'azure-queue'
              metadata: {
                accountName: dataAccountName
                queueName: 'jobs'
                queueLength: '1'
              }
              identity: identityId
            }
          ]
        }
      }
    }
    template: {
      containers: [
        {
          name: 'worker'
          image: jobImage
          resources: {
            cpu: workerCpu
            memory: workerMemory
          }
          env: [for setting in items(jobSettings): {
            name: setting.key
            value: setting.value
          }]
          volumeMounts: [
            {
              volumeName: 'models'
              mountPath: '/mounts/models'
            }
          ]
        }
      ]
      volumes: [
        {
          name: 'models'
          storageType: 'AzureFile'
          storageName: modelsStorage.name
        }
      ]
    }
  }
}

output environmentId string = managedEnvironment.id
output jobName string = job.name
