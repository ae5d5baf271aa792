// Container Apps environment (Consumption + one serverless GPU workload profile) and two event-triggered
// jobs running `python -m job`, each started by KEDA while its queue has messages (azure-queue scaler,
// authenticated with the user-assigned identity: no connection string):
// - `<prefix>-gpu` on the GPU profile takes `jobs-gpu` (embed, train_head);
// - `<prefix>-cpu` on the Consumption profile takes `jobs` (reindex, retrain, analyse, ingest_container, dedupe): no GPU billed for
//   work that cannot use one.
// A GPU workload profile can only be added when the environment is created: changing gpuProfileType on an
// existing environment fails; delete the environment (or deploy a new one) to change it.

param environmentName string

@description('Job names are <prefix>-gpu and <prefix>-cpu.')
param jobNamePrefix string

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

@description('GPU job image; empty: the placeholder (the postprovision hook builds the real one and sets it).')
param gpuJobImage string

@description('CPU job image; empty: the placeholder (the postprovision hook builds the real one and sets it).')
param cpuJobImage string

@allowed([
  'Consumption-GPU-NC8as-T4'
  'Consumption-GPU-NC24-A100'
])
param gpuProfileType string

param jobParallelism int

param jobMaxExecutions int

param cpuJobMaxExecutions int

resource workspace 'Microsoft.OperationalInsights/workspaces@2023-09-01' existing = {
  name: workspaceName
}

// A whole serverless GPU: NC8as-T4 gives 8 vCPU / 56 GiB, NC24-A100 24 vCPU / 220 GiB. The CPU job gets
// the largest Consumption-profile replica (4 vCPU / 8 GiB).
var isA100 = gpuProfileType == 'Consumption-GPU-NC24-A100'
var gpuCpu = isA100 ? 24 : 8
var gpuMemory = isA100 ? '220Gi' : '56Gi'

// A Container Apps job cannot be created with an image that is not in the registry yet (MANIFEST_UNKNOWN),
// and on a first `azd up` the registry is empty: the jobs start on Microsoft's public jobs quickstart
// image, which exits without touching the queues, until the postprovision hook has built and set ours.
var placeholderImage = 'mcr.microsoft.com/k8se/quickstart-jobs:latest'

// The jobs' environment: the settings of infra/app-settings.json (the timer schedules are unused but
// harmless), the identity-based storage URL and telemetry.
var sharedSettings = loadJsonContent('../app-settings.json').settings
var commonSettings = union(sharedSettings, {
  // Jobs only: where the publisher mirrors each index version (the `index` share, read-write here); the
  // function app mounts the same share and opens versions from CLUSTERLENS_INDEX_MOUNT.
  CLUSTERLENS_INDEX_SHARE_DIR: '/mounts/index'
  AZURE_CLIENT_ID: identityClientId
  CLUSTERLENS_AZURE_STORAGE_ACCOUNT_URL: blobEndpoint
  APPLICATIONINSIGHTS_CONNECTION_STRING: appInsightsConnectionString
  APPLICATIONINSIGHTS_AUTHENTICATION_STRING: 'ClientId=${identityClientId};Authorization=AAD'
})

// One entry per job: what differs between the GPU and the CPU worker.
var jobs = [
  {
    name: '${jobNamePrefix}-gpu'
    profile: 'gpu'
    queue: sharedSettings.CLUSTERLENS_GPU_QUEUE_NAME
    serves: 'gpu'
    image: empty(gpuJobImage) ? placeholderImage : gpuJobImage
    cpu: gpuCpu
    memory: gpuMemory
    parallelism: jobParallelism
    maxExecutions: jobMaxExecutions
    settings: union(commonSettings, {
      CLUSTERLENS_ORT_PROVIDERS: '["CUDAExecutionProvider", "CPUExecutionProvider"]'
      CLUSTERLENS_EMBED_DECODE_WORKERS: string(gpuCpu)
    })
  }
  {
    name: '${jobNamePrefix}-cpu'
    profile: 'Consumption'
    queue: sharedSettings.CLUSTERLENS_QUEUE_NAME
    serves: 'cpu'
    image: empty(cpuJobImage) ? placeholderImage : cpuJobImage
    cpu: 4
    memory: '8Gi'
    parallelism: 1
    maxExecutions: cpuJobMaxExecutions
    settings: union(commonSettings, {
      CLUSTERLENS_EMBED_DECODE_WORKERS: '4'
    })
  }
]

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

// The Azure Files shares the jobs mount: `models` read-only, `index` read-write (the reindex job mirrors each
// index version there before swapping the blob pointer, CLUSTERLENS_INDEX_SHARE_DIR). Environment storage
// mounts authenticate with the account key; the key goes here only.
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

resource indexStorage 'Microsoft.App/managedEnvironments/storages@2025-01-01' = {
  parent: managedEnvironment
  name: 'index'
  properties: {
    azureFile: {
      accountName: filesAccountName
      accountKey: listKeys(resourceId('Microsoft.Storage/storageAccounts', filesAccountName), '2023-05-01').keys[0].value
      shareName: 'index'
      accessMode: 'ReadWrite'
    }
  }
  // one environment update at a time
  dependsOn: [
    modelsStorage
  ]
}

resource job 'Microsoft.App/jobs@2025-01-01' = [for spec in jobs: {
  name: spec.name
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
    workloadProfileName: spec.profile
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
        parallelism: spec.parallelism
        // Every replica works the queue until it is empty, then exits: the execution is complete when all
        // of them are (with 1 here, the first replica to exit would end the execution and stop the others
        // in the middle of a message).
        replicaCompletionCount: spec.parallelism
        scale: {
          minExecutions: 0
          maxExecutions: spec.maxExecutions
          pollingInterval: 30
          rules: [
            {
              name: 'queue'
              type: 'azure-queue'
              metadata: {
                accountName: dataAccountName
                queueName: spec.queue
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
          image: spec.image
          args: [
            '--queues'
            spec.serves
          ]
          resources: {
            cpu: spec.cpu
            memory: spec.memory
          }
          env: [for setting in items(spec.settings): {
            name: setting.key
            value: setting.value
          }]
          volumeMounts: [
            {
              volumeName: 'models'
              mountPath: '/mounts/models'
            }
            {
              volumeName: 'index'
              mountPath: '/mounts/index'
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
        {
          name: 'index'
          storageType: 'AzureFile'
          storageName: indexStorage.name
        }
      ]
    }
  }
}]

output environmentId string = managedEnvironment.id
output gpuJobName string = job[0].name
output cpuJobName string = job[1].name
