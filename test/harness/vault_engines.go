package harness

import (
	"context"
	"fmt"
	"net/url"
	"os"
	"strconv"
	"strings"
	"time"

	vaultapi "github.com/hashicorp/vault/api"
)

// EnablePKI mounts a pki secrets engine at mount (max lease TTL 87600h), generates an internal root
// CA there (common name "keyward test root <mount>", its key never leaves Vault), points the issuing
// certificate and CRL URLs at this server, and returns the CA certificate in PEM.
func (v *Vault) EnablePKI(ctx context.Context, mount string) (caPEM []byte, err error) {
	if err := v.Client.Sys().MountWithContext(ctx, mount, &vaultapi.MountInput{
		Type: "pki", Config: vaultapi.MountConfigInput{MaxLeaseTTL: "87600h"},
	}); err != nil {
		return nil, fmt.Errorf("mount pki at %s: %w", mount, err)
	}
	s, err := v.Client.Logical().WriteWithContext(ctx, mount+"/root/generate/internal", map[string]any{
		"common_name": "keyward test root " + mount,
		"ttl":         "87600h",
		"key_type":    "ec",
		"key_bits":    256,
	})
	if err != nil {
		return nil, fmt.Errorf("generate the root CA of %s: %w", mount, err)
	}
	ca, _ := s.Data["certificate"].(string)
	if ca == "" {
		return nil, fmt.Errorf("generate the root CA of %s: no certificate in the response", mount)
	}
	base := v.Addr + "/v1/" + mount
	if _, err := v.Client.Logical().WriteWithContext(ctx, mount+"/config/urls", map[string]any{
		"issuing_certificates":    []string{base + "/ca"},
		"crl_distribution_points": []string{base + "/crl"},
	}); err != nil {
		return nil, fmt.Errorf("configure the URLs of %s: %w", mount, err)
	}
	return []byte(ca + "\n"), nil
}

// PKIRole writes the pki role <mount>/roles/<role>: certificates for allowedDomains and their
// subdomains, EC P-256 keys by default, at most maxTTL, stored (no_store false, so they can be
// revoked and looked up by serial) and each with a lease (generate_lease), which revoking
// (sys/leases/revoke) revokes the certificate with.
func (v *Vault) PKIRole(ctx context.Context, mount, role string, allowedDomains []string, maxTTL time.Duration) error {
	_, err := v.Client.Logical().WriteWithContext(ctx, mount+"/roles/"+role, map[string]any{
		"allowed_domains":    allowedDomains,
		"allow_subdomains":   true,
		"allow_bare_domains": true,
		"generate_lease":     true,
		"no_store":           false,
		"key_type":           "ec",
		"key_bits":           256,
		"max_ttl":            seconds(maxTTL),
	})
	if err != nil {
		return fmt.Errorf("pki role %s/roles/%s: %w", mount, role, err)
	}
	return nil
}

// postgresDBName is the name of the database connection EnableDatabase writes (<mount>/config/pg).
const postgresDBName = "pg"

// EnableDatabase mounts the database secrets engine at mount and configures its connection "pg" to
// pg with the builtin postgresql-database-plugin, as pg's superuser, for every role of the mount,
// verifying the connection. Vault keeps the superuser password (it never rotates it here).
func (v *Vault) EnableDatabase(ctx context.Context, mount string, pg *Postgres) error {
	if err := v.Client.Sys().MountWithContext(ctx, mount, &vaultapi.MountInput{Type: "database"}); err != nil {
		return fmt.Errorf("mount database at %s: %w", mount, err)
	}
	conn := url.URL{Scheme: "postgresql", Host: hostPort(pg.Port), Path: "/postgres", RawQuery: "sslmode=disable"}
	_, err := v.Client.Logical().WriteWithContext(ctx, mount+"/config/"+postgresDBName, map[string]any{
		"plugin_name": "postgresql-database-plugin",
		// Vault fills in the templated username and password (and percent-encodes them).
		"connection_url":    "postgresql://{{username}}:{{password}}@" + conn.Host + conn.Path + "?" + conn.RawQuery,
		"username":          pg.User,
		"password":          pg.Password,
		"allowed_roles":     "*",
		"verify_connection": true,
	})
	if err != nil {
		return fmt.Errorf("database connection %s/config/%s: %w", mount, postgresDBName, err)
	}
	return nil
}

// DatabaseRole writes the database role <mount>/roles/<role> on the connection EnableDatabase made:
// each credential is a new login role valid until its lease expires, with CONNECT on the postgres
// database; revoking its lease ends the role's sessions and drops it.
func (v *Vault) DatabaseRole(ctx context.Context, mount, role string, defaultTTL, maxTTL time.Duration) error {
	_, err := v.Client.Logical().WriteWithContext(ctx, mount+"/roles/"+role, map[string]any{
		"db_name": postgresDBName,
		"creation_statements": []string{
			`CREATE ROLE "{{name}}" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}';`,
			`GRANT CONNECT ON DATABASE postgres TO "{{name}}";`,
		},
		"revocation_statements": []string{
			`SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{{name}}';`,
			`REVOKE CONNECT ON DATABASE postgres FROM "{{name}}";`,
			`DROP ROLE IF EXISTS "{{name}}";`,
		},
		"default_ttl": seconds(defaultTTL),
		"max_ttl":     seconds(maxTTL),
	})
	if err != nil {
		return fmt.Errorf("database role %s/roles/%s: %w", mount, role, err)
	}
	return nil
}

// DynamicPolicyTemplate is deploy/vault/namespace-dynamic.hcl, the one source of the dynamic-secrets
// policy text: deploy/vault/setup.sh and the tests fill in the same file.
const DynamicPolicyTemplate = "deploy/vault/namespace-dynamic.hcl"

// DynamicPolicy is deploy/vault/namespace-dynamic.hcl for the pki engine at pkiMount and the database
// engine at dbMount, with the accessor of the kubernetes auth method at authMount filled in, as
// deploy/vault/setup.sh writes it.
func (v *Vault) DynamicPolicy(ctx context.Context, authMount, pkiMount, dbMount string) (string, error) {
	accessor, err := v.authAccessor(ctx, authMount)
	if err != nil {
		return "", err
	}
	path, err := RepoFile(DynamicPolicyTemplate)
	if err != nil {
		return "", err
	}
	tmpl, err := os.ReadFile(path)
	if err != nil {
		return "", err
	}
	return strings.NewReplacer("@PKI_MOUNT@", pkiMount, "@DB_MOUNT@", dbMount, "@AUTH_ACCESSOR@", accessor).Replace(string(tmpl)), nil
}

// PutDynamicPolicy writes the policy <env>-dynamic (DynamicPolicy): a token of a kubernetes-auth
// login may issue and sign certificates with, and read database credentials of, the roles named
// <its namespace>-..., and revoke, list and look up their leases.
func (v *Vault) PutDynamicPolicy(ctx context.Context, authMount, pkiMount, dbMount, env string) error {
	text, err := v.DynamicPolicy(ctx, authMount, pkiMount, dbMount)
	if err != nil {
		return err
	}
	return v.Client.Sys().PutPolicyWithContext(ctx, env+"-dynamic", text)
}

// authAccessor is the accessor of the auth method enabled at mount.
func (v *Vault) authAccessor(ctx context.Context, mount string) (string, error) {
	auths, err := v.Client.Sys().ListAuthWithContext(ctx)
	if err != nil {
		return "", err
	}
	auth, ok := auths[strings.Trim(mount, "/")+"/"]
	if !ok || auth.Accessor == "" {
		return "", fmt.Errorf("no auth method enabled at %s: enable it before writing a policy that names it", mount)
	}
	return auth.Accessor, nil
}

// seconds is d as Vault's duration strings take it ("600s").
func seconds(d time.Duration) string { return strconv.FormatInt(int64(d/time.Second), 10) + "s" }
