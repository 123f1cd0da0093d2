#!/usr/bin/env bash
# Example Vault layout matching Keyward's scoping: one KV v2 mount, one prefix per environment, a
# read-only policy per environment and a kubernetes-auth role per environment bound to that
# environment's namespaces and to the broker's audience. Vault then re-checks every read the broker
# makes on behalf of a pod (vault.mode: pod).
#   VAULT_ADDR=... VAULT_TOKEN=... KUBE_HOST=https://... KUBE_CA=/path/ca.crt REVIEWER_JWT=... ./setup.sh
set -euo pipefail
vault secrets enable -path=kv -version=2 kv
for env in prod dev; do
  vault policy write "$env-read" - <<HCL
path "kv/data/$env/*" { capabilities = ["read"] }
HCL
done
vault auth enable kubernetes
vault write auth/kubernetes/config kubernetes_host="$KUBE_HOST" kubernetes_ca_cert=@"$KUBE_CA" \
  token_reviewer_jwt="$REVIEWER_JWT" disable_local_ca_jwt=true
# Bind each role to the namespaces labelled with its environment (keep in sync with the labels).
# Keep Vault's default policy on the roles' tokens (no token_no_default_policy): it allows
# auth/token/revoke-self, which keyward-broker uses to revoke a pod's token when its volumes go.
vault write auth/kubernetes/role/prod bound_service_account_names='*' \
  bound_service_account_namespaces=payments-prod audience=keyward token_policies=prod-read token_ttl=10m
vault write auth/kubernetes/role/dev bound_service_account_names='*' \
  bound_service_account_namespaces=payments-dev audience=keyward token_policies=dev-read token_ttl=10m
vault kv put kv/prod/payments-prod/db password=change-me
vault kv put kv/dev/payments-dev/db password=change-me
