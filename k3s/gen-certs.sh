#!/bin/sh
# Make what k3s/nodes/kustomization.yaml's Secrets are generated from, in k3s/nodes/certs/:
# a lab CA, one certificate per StatefulSet pod (its stable DNS names as SANs), the
# client certificate a lab attaches with (lab.pem: nodes accept sessions only from
# holders of a certificate of their CA) and a random admin token.  Existing files are
# kept (delete k3s/nodes/certs/ to start over).
#
#   k3s/gen-certs.sh                                  # namespace macula-test, 3 pods
#   k3s/gen-certs.sh --ip 192.168.1.50                # + an address clients dial from
#                                                     #   outside (NodePort 30443)
#   k3s/gen-certs.sh --namespace lab --replicas 5 --dns k3s.example.org --dir /tmp/c
#
# Needs `macula-lab` on PATH (pip install macula-lab) or MACULA_LAB=/path/to/macula-lab.
set -eu

namespace=macula-test
replicas=3
dir="$(dirname "$0")/nodes/certs"
domain=cluster.local
extra=""
while [ $# -gt 0 ]; do
    case "$1" in
        --namespace) namespace="$2"; shift 2 ;;
        --replicas) replicas="$2"; shift 2 ;;
        --dir) dir="$2"; shift 2 ;;
        --cluster-domain) domain="$2"; shift 2 ;;
        --ip) extra="$extra --ip $2"; shift 2 ;;
        --dns) extra="$extra --dns $2"; shift 2 ;;
        -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
        *) echo "gen-certs.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
lab="${MACULA_LAB:-macula-lab}"

mkdir -p "$dir"
[ -f "$dir/ca.pem" ] || "$lab" certs init --dir "$dir" --cn "macula-lab k3s CA ($namespace)"
i=0
while [ "$i" -lt "$replicas" ]; do
    pod="macula-$i"
    svc="$pod.macula-headless"
    if [ ! -f "$dir/$pod.pem" ]; then
        # shellcheck disable=SC2086  # $extra is a list of options
        "$lab" certs issue "$pod" --dir "$dir" --dns "$svc" --dns "$svc.$namespace" \
            --dns "$svc.$namespace.svc" --dns "$svc.$namespace.svc.$domain" $extra
    fi
    i=$((i + 1))
done
[ -f "$dir/lab.pem" ] || "$lab" certs issue-client lab --dir "$dir"
if [ ! -f "$dir/admin-token" ]; then
    umask 077
    # no trailing newline: the Secret's value is the token itself
    od -An -N24 -tx1 /dev/urandom | tr -d ' \n' > "$dir/admin-token"
fi
echo "k3s certificates and admin token in $dir"
