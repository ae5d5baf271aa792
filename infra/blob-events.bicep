// The Event Grid subscription: BlobCreated in `uploads` -> the Function App's blob extension webhook (the
// `ingest_blob` function, a blob trigger with source EventGrid). Dead letters go to the `quarantine`
// container, written with the user-assigned identity.
//
// Deployed AFTER the Function App's code, by the postdeploy hook (azure.yaml -> infra/hooks/postdeploy.*),
// never by main.bicep: the webhook URL carries the host's `blobs_extension` system key, which the Functions
// host creates only once the code with the Event Grid blob trigger runs. The hook waits for that key, then
// runs `az deployment group create -f infra/blob-events.bicep`; deploying it again updates it in place.
targetScope = 'resourceGroup'

@description('The system topic on the data account (main.bicep output CLUSTERLENS_SYSTEM_TOPIC_NAME).')
param systemTopicName string

@description('The Function App (main.bicep output AZURE_FUNCTION_APP_NAME).')
param functionAppName string

@description('Resource id of the user-assigned identity that writes dead letters.')
param identityId string

@description('The data storage account (dead-letter destination).')
param dataAccountName string

resource systemTopic 'Microsoft.EventGrid/systemTopics@2022-06-15' existing = {
  name: systemTopicName
}

resource functionApp 'Microsoft.Web/sites@2024-04-01' existing = {
  name: functionAppName
}

resource dataAccount 'Microsoft.Storage/storageAccounts@2023-05-01' existing = {
  name: dataAccountName
}

resource blobUploads 'Microsoft.EventGrid/systemTopics/eventSubscriptions@2022-06-15' = {
  parent: systemTopic
  name: 'blob-uploads'
  properties: {
    destination: {
      endpointType: 'WebHook'
      properties: {
        endpointUrl: 'https://${functionApp.properties.defaultHostName}/runtime/webhooks/blobs?functionName=Host.Functions.ingest_blob&code=${listKeys('${functionApp.id}/host/default', '2023-12-01').systemKeys.blobs_extension}'
      }
    }
    filter: {
      includedEventTypes: [
        'Microsoft.Storage.BlobCreated'
      ]
      subjectBeginsWith: '/blobServices/default/containers/uploads/'
      advancedFilters: [
        {
          operatorType: 'StringIn'
          key: 'data.api'
          values: [
            'PutBlob'
            'PutBlockList'
            'CopyBlob'
          ]
        }
      ]
    }
    eventDeliverySchema: 'EventGridSchema'
    retryPolicy: {
      maxDeliveryAttempts: 30
      eventTimeToLiveInMinutes: 1440
    }
    deadLetterWithResourceIdentity: {
      identity: {
        type: 'UserAssigned'
        userAssignedIdentity: identityId
      }
      deadLetterDestination: {
        endpointType: 'StorageBlob'
        properties: {
          resourceId: dataAccount.id
          blobContainerName: 'quarantine'
        }
      }
    }
  }
}

output eventSubscriptionName string = blobUploads.name
