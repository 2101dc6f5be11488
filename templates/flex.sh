#!/usr/bin/env bash
# Builds anchorscan's Dataflow Flex templates, or runs one.
#
#   templates/flex.sh build IMAGE TEMPLATES
#       builds templates/Dockerfile once per command (IMAGE-fit, IMAGE-score, IMAGE-stream: the
#       same layers but for the command's name), pushes them, and writes TEMPLATES/COMMAND.json
#       with templates/COMMAND/metadata.json
#       e.g. templates/flex.sh build europe-west4-docker.pkg.dev/my-project/images/anchorscan:0.1.0 gs://my-bucket/templates
#
#   templates/flex.sh run COMMAND TEMPLATES REGION PARAMETERS [gcloud flags ...]
#       starts a job from TEMPLATES/COMMAND.json; PARAMETERS as gcloud takes them (name=value,
#       comma-separated; ^;^ first to separate them with ; when values hold commas); the image
#       serves as the workers' SDK container too
#       e.g. templates/flex.sh run score gs://my-bucket/templates europe-west4 \
#                '^;^input=gs://my-bucket/crawl/*.jpg;anchor=gs://my-bucket/a.safetensors;output=gs://my-bucket/scan'
set -euo pipefail
cd "$(dirname "$0")/.."
COMMANDS=(fit score stream)

usage() { sed -n '2,18p' "$0" >&2; exit 2; }

# Beam's version as constraints.txt pins it: the SDK container the image is built on.
beam_version() { sed -n 's/^apache-beam==//p' "$(dirname "$0")/../constraints.txt"; }

build() {
    local image=$1 templates=${2%/} beam
    beam=$(beam_version)
    for command in "${COMMANDS[@]}"; do
        docker build -f templates/Dockerfile --build-arg COMMAND="$command" --build-arg BEAM_VERSION="$beam" \
            -t "$image-$command" .
        docker push "$image-$command"
        gcloud dataflow flex-template build "$templates/$command.json" \
            --image "$image-$command" --sdk-language PYTHON \
            --metadata-file "templates/$command/metadata.json"
    done
}

run() {
    local command=$1 templates=${2%/} region=$3 parameters=$4
    shift 4
    local spec="$templates/$command.json" image
    image=$(gcloud storage cat "$spec" | python3 -c 'import json, sys; print(json.load(sys.stdin)["image"])')
    gcloud dataflow flex-template run "anchorscan-$command-$(date +%Y%m%d-%H%M%S)" \
        --template-file-gcs-location "$spec" --region "$region" \
        --parameters "$parameters" --parameters "sdk_container_image=$image" "$@"
}

case "${1:-}" in
    build) [ $# -eq 3 ] || usage; build "$2" "$3" ;;
    run) [ $# -ge 5 ] || usage; case "$2" in fit|score|stream) ;; *) usage ;; esac; run "${@:2}" ;;
    *) usage ;;
esac
