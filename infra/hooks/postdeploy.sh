#!/bin/sh
# azd postdeploy hook (azure.yaml): create (or update) the Event Grid subscription that sends BlobCreated
# events for `uploads/` to the blob trigger, once the Function App's code is deployed.
#
# The webhook URL needs the host's `blobs_extension` system key, which the Functions host creates only
# after the code with the Event Grid blob trigger has started: provisioning cannot have it. This hook
# wakes the app, waits for the key (up to CLUSTERLENS_KEY_WAIT_SECONDS, 600 by default), then deploys
# infra/blob-events.bicep, which reads the key itself. Running it again updates the subscription in place.
set -eu

for cmd in az curl; do
  command -v "$cmd" >/dev/null || { echo "postdeploy: '$cmd' is not installed (docs/deploy.md, Prerequisites)" >&2; exit 1; }
done
: "${AZURE_RESOURCE_GROUP:?postdeploy: AZURE_RESOURCE_GROUP is not set (run through azd)}"
: "${AZURE_FUNCTION_APP_NAME:?postdeploy: the main.bicep outputs are missing (run through azd)}"

root="$(cd "$(dirname "$0")/../.." && pwd)"
host="$(az functionapp show -n "$AZURE_FUNCTION_APP_NAME" -g "$AZURE_RESOURCE_GROUP" --query defaultHostName -o tsv)"
deadline=$(( $(date +%s) + ${CLUSTERLENS_KEY_WAIT_SECONDS:-600} ))
key=""
while [ -z "$key" ]; do
  # Any request starts an instance; the host creates its system keys as it starts.
  curl -s -o /dev/null --max-time 30 "https://$host/api/health" || true
  key="$(az functionapp keys list -n "$AZURE_FUNCTION_APP_NAME" -g "$AZURE_RESOURCE_GROUP" \
    --query systemKeys.blobs_extension -o tsv 2>/dev/null || true)"
  if [ -z "$key" ]; then
    if [ "$(date +%s)" -ge "$deadline" ]; then
      echo "postdeploy: no blobs_extension key on $AZURE_FUNCTION_APP_NAME yet; check the app's logs, then run: azd hooks run postdeploy" >&2
      exit 1
    fi
    echo "postdeploy: waiting for the host's blobs_extension key..."
    sleep 15
  fi
done

az deployment group create --resource-group "$AZURE_RESOURCE_GROUP" --name blob-events \
  --template-file "$root/infra/blob-events.bicep" --output none \
  --parameters systemTopicName="$CLUSTERLENS_SYSTEM_TOPIC_NAME" functionAppName="$AZURE_FUNCTION_APP_NAME" \
  identityId="$CLUSTERLENS_IDENTITY_ID" dataAccountName="$CLUSTERLENS_DATA_ACCOUNT_NAME"
echo "postdeploy: blobs created in uploads/ now reach ingest_blob"
