#!/bin/sh
# azd postprovision hook (azure.yaml): build the two job images in the registry and point the jobs at them.
#
# A Container Apps job cannot be created with an image that is not in the registry yet, so main.bicep
# creates both jobs on a placeholder image; this hook builds ours with `az acr build` (a build in the
# registry: no local Docker) and sets them. The image names are kept in the azd environment
# (CLUSTERLENS_GPU_JOB_IMAGE / CLUSTERLENS_CPU_JOB_IMAGE, read by main.parameters.json), so a later
# `azd provision` keeps them and this hook builds nothing. CLUSTERLENS_REBUILD_JOB_IMAGES=true builds
# again (new job code); CLUSTERLENS_SKIP_IMAGE_BUILD=true builds nothing (you push the images yourself).
set -eu

for cmd in az azd; do
  command -v "$cmd" >/dev/null || { echo "postprovision: '$cmd' is not installed (docs/deploy.md, Prerequisites)" >&2; exit 1; }
done
: "${AZURE_RESOURCE_GROUP:?postprovision: AZURE_RESOURCE_GROUP is not set (run through azd)}"
: "${CLUSTERLENS_REGISTRY_NAME:?postprovision: the main.bicep outputs are missing (run through azd)}"

if [ "${CLUSTERLENS_SKIP_IMAGE_BUILD:-false}" = "true" ]; then
  echo "postprovision: CLUSTERLENS_SKIP_IMAGE_BUILD=true: not building the job images"
  exit 0
fi
if [ -n "${CLUSTERLENS_GPU_JOB_IMAGE:-}" ] && [ -n "${CLUSTERLENS_CPU_JOB_IMAGE:-}" ] \
  && [ "${CLUSTERLENS_REBUILD_JOB_IMAGES:-false}" != "true" ]; then
  echo "postprovision: the jobs already run $CLUSTERLENS_GPU_JOB_IMAGE and $CLUSTERLENS_CPU_JOB_IMAGE"
  exit 0
fi

root="$(cd "$(dirname "$0")/../.." && pwd)"
tag="$(date -u +%Y%m%d%H%M%S)"
server="$(az acr show -n "$CLUSTERLENS_REGISTRY_NAME" --query loginServer -o tsv)"

build() {  # build <image name> <VARIANT> <job name> <azd variable>
  image="$server/$1:$tag"
  echo "postprovision: building $image (VARIANT=$2) in $CLUSTERLENS_REGISTRY_NAME"
  az acr build --registry "$CLUSTERLENS_REGISTRY_NAME" --image "$1:$tag" --image "$1:latest" \
    --build-arg "VARIANT=$2" --file "$root/job/Dockerfile" --platform linux/amd64 --timeout 7200 "$root"
  az containerapp job update --name "$3" --resource-group "$AZURE_RESOURCE_GROUP" --image "$image" --output none
  azd env set "$4" "$image"
}

build clusterlens-job-cpu cpu "$CLUSTERLENS_CPU_JOB_NAME" CLUSTERLENS_CPU_JOB_IMAGE
build clusterlens-job gpu "$CLUSTERLENS_GPU_JOB_NAME" CLUSTERLENS_GPU_JOB_IMAGE
echo "postprovision: both jobs run the images built from this checkout ($tag)"
