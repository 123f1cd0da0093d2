#!/usr/bin/env bash
# Example Vault layout matching Keyward's scoping: one KV v2 mount, one prefix per environment
# (<mount>/<environment>/<namespace>/... and <mount>/<environment>/shared/...), and per environment a
# kubernetes-auth role bound to that environment's namespaces and the broker's audience, with the
# policy in namespace-read.hcl: templated on the namespace Vault saw at login, so a token reads only
# its own namespace's subtree of its environment and the environment's shared subtree. Vault then
# re-checks every read the broker makes on behalf of a pod (vault.mode: pod), and a pod that logs in
# to Vault directly with a token of its own gets no more than its namespace's subtree.
#   VAULT_ADDR=... VAULT_TOKEN=... KUBE_HOST=https://... KUBE_CA=/path/ca.crt REVIEWER_JWT=... ./setup.sh
# Optional: PROD_NAMESPACES, DEV_NAMESPACES (comma-separated; default payments-prod, payments-dev),
# KV_MOUNT (kv), AUTH_MOUNT (kubernetes), EXAMPLE_SECRETS=0 to write no example secrets.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
kv=${KV_MOUNT:-kv}
auth=${AUTH_MOUNT:-kubernetes}
declare -A namespaces=([prod]="${PROD_NAMESPACES:-payments-prod}" [dev]="${DEV_NAMESPACES:-payments-dev}")
vault secrets enable -path="$kv" -version=2 kv
vault auth enable -path="$auth" kubernetes
vault write "auth/$auth/config" kubernetes_host="$KUBE_HOST" kubernetes_ca_cert=@"$KUBE_CA" \
  token_reviewer_jwt="$REVIEWER_JWT" disable_local_ca_jwt=true
# The policy names the namespace by the auth method's accessor, which exists once the method is enabled.
accessor=$(vault read -field=accessor "sys/auth/$auth")
for env in prod dev; do
  sed -e "s|@KV_MOUNT@|$kv|g" -e "s|@ENV_PREFIX@|$env|g" -e "s|@AUTH_ACCESSOR@|$accessor|g" \
    "$here/namespace-read.hcl" | vault policy write "$env-read" -
  # Bind each role to the namespaces labelled with its environment (keep in sync with the labels:
  # Vault does not read them). Any service account of those namespaces may log in: which service
  # account gets which ref is the broker's policy. Keep Vault's default policy on the roles' tokens
  # (no token_no_default_policy): it allows auth/token/revoke-self, which keyward-broker uses to
  # revoke a pod's token when its volumes go.
  vault write "auth/$auth/role/$env" bound_service_account_names='*' \
    bound_service_account_namespaces="${namespaces[$env]}" audience=keyward token_policies="$env-read" token_ttl=10m
done
if [ "${EXAMPLE_SECRETS:-1}" = 1 ]; then
  vault kv put "$kv/prod/payments-prod/db" password=change-me
  vault kv put "$kv/dev/payments-dev/db" password=change-me
fi
# Dynamic secrets (PKI certificates and database credentials tied to a pod's lifetime): an example,
# commented out, of what test/harness does (Vault.EnablePKI, PKIRole, EnableDatabase, DatabaseRole,
# PutDynamicPolicy). Per environment a pki and a database mount; Vault role names of a namespace start
# with the namespace and an underscore (payments-prod_web), which namespace-dynamic.hcl scopes a
# login's token to; the policy <env>-dynamic joins <env>-read on the environment's kubernetes-auth
# role. PG_HOST, PG_USER and PG_PASSWORD_FILE name the database
# and a superuser (or a role with CREATEROLE) for Vault.
# for env in prod dev; do
#   vault secrets enable -path="pki-$env" -max-lease-ttl=87600h pki
#   vault write -field=certificate "pki-$env/root/generate/internal" common_name="keyward $env root" \
#     ttl=87600h key_type=ec key_bits=256 > "pki-$env-ca.pem"
#   vault write "pki-$env/config/urls" issuing_certificates="$VAULT_ADDR/v1/pki-$env/ca" \
#     crl_distribution_points="$VAULT_ADDR/v1/pki-$env/crl"
#   vault secrets enable -path="db-$env" database
#   vault write "db-$env/config/pg" plugin_name=postgresql-database-plugin allowed_roles='*' \
#     connection_url="postgresql://{{username}}:{{password}}@$PG_HOST:5432/postgres?sslmode=verify-full" \
#     username="$PG_USER" password=@"$PG_PASSWORD_FILE" verify_connection=true
#   sed -e "s|@PKI_MOUNT@|pki-$env|g" -e "s|@DB_MOUNT@|db-$env|g" -e "s|@AUTH_ACCESSOR@|$accessor|g" \
#     "$here/namespace-dynamic.hcl" | vault policy write "$env-dynamic" -
#   vault write "auth/$auth/role/$env" bound_service_account_names='*' \
#     bound_service_account_namespaces="${namespaces[$env]}" audience=keyward \
#     token_policies="$env-read,$env-dynamic" token_ttl=10m
# done
# and per namespace its roles, e.g. for payments-prod:
#   vault write pki-prod/roles/payments-prod_web allowed_domains=payments-prod.svc.cluster.local \
#     allow_subdomains=true allow_bare_domains=true generate_lease=true no_store=false \
#     key_type=ec key_bits=256 max_ttl=24h
#   vault write db-prod/roles/payments-prod_ro db_name=pg default_ttl=1h max_ttl=24h \
#     creation_statements="CREATE ROLE \"{{name}}\" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}'; GRANT CONNECT ON DATABASE postgres TO \"{{name}}\";" \
#     revocation_statements="SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{{name}}'; REVOKE CONNECT ON DATABASE postgres FROM \"{{name}}\"; DROP ROLE IF EXISTS \"{{name}}\";"
