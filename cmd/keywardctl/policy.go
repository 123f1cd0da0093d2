package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"strings"

	"github.com/keyward/keyward/broker"
	"github.com/keyward/keyward/broker/policy"
	"github.com/keyward/keyward/csi"
)

// errDenied is a policy decision of deny (exit 1, like any finding).
var errDenied = errors.New("denied")

func policyCommand(e streams, args []string) error {
	if len(args) == 0 {
		return fmt.Errorf("policy: want check or lint: %w", errUsage)
	}
	switch args[0] {
	case "lint":
		pos, err := parse(newFlags("policy lint", e), args[1:])
		if err != nil {
			return err
		}
		if len(pos) != 1 {
			return fmt.Errorf("policy lint takes one FILE: %w", errUsage)
		}
		p, err := policy.Load(pos[0])
		if err != nil {
			return err
		}
		fmt.Fprintf(e.stdout, "%s: valid (%d environments, %d grants, hash %s)\n", pos[0], len(p.Environments), len(p.Grants), p.Hash())
		set := p.IssueBudgets
		if set == nil {
			set = &policy.IssueBudgets{}
		}
		b := p.Budgets()
		fmt.Fprintf(e.stdout, "issue budgets: pod %s%s; namespace %s%s\n", b.Pod, isDefault(set.Pod), b.Namespace, isDefault(set.Namespace))
		return nil
	case "check":
		fs := newFlags("policy check", e)
		file := fs.String("policy", "/etc/keyward/policy.yaml", "policy file")
		ns := fs.String("namespace", "", "the pod's namespace")
		envName := fs.String("environment", "", "the namespace's keyward.dev/environment label (empty: none)")
		sa := fs.String("service-account", "", "the pod's service account")
		ref := fs.String("ref", "", "the ref the pod asks for, e.g. payments/db")
		pkiRole := fs.String("pki-role", "", "instead of --ref: the Vault PKI role a certificate is asked of, e.g. payments_web")
		dbRole := fs.String("database-role", "", "instead of --ref: the Vault database role credentials are asked of, e.g. payments_ro")
		key := fs.String("key", "value", "the key inside the secret (with --pki-role: cert, key or chain; with --database-role: username or password; default: all of them)")
		secrets := fs.String("secrets", "", "instead of --ref and --key: a file holding a volume's secrets list (its secrets attribute); every ref and key it reads is checked, templates' included")
		if _, err := parse(fs, args[1:]); err != nil {
			return err
		}
		asked := 0
		for _, v := range []string{*ref, *pkiRole, *dbRole, *secrets} {
			if v != "" {
				asked++
			}
		}
		if *ns == "" || *sa == "" || asked != 1 {
			return fmt.Errorf("--namespace, --service-account and one of --ref or --secrets (or, instead of --ref, --pki-role or --database-role) are required: %w", errUsage)
		}
		keySet := false
		fs.Visit(func(f *flag.Flag) { keySet = keySet || f.Name == "key" })
		p, err := policy.Load(*file)
		if err != nil {
			return err
		}
		a := policy.NewAuthorizer(p, policy.StaticNamespaces{*ns: *envName})
		id := broker.Identity{Namespace: *ns, ServiceAccount: *sa}
		if *secrets != "" {
			return checkSecrets(e, a, id, *secrets)
		}
		if *pkiRole != "" || *dbRole != "" {
			sref := broker.SecretRef{Kind: broker.KindPKI, Ref: *pkiRole}
			if *dbRole != "" {
				sref = broker.SecretRef{Kind: broker.KindDatabase, Ref: *dbRole}
			}
			parts := broker.DynamicKeys(sref.Kind)
			if keySet {
				parts = []string{*key}
			}
			return checkDynamic(e, a, id, sref, parts)
		}
		sref := broker.SecretRef{Ref: *ref, Key: *key}
		// The broker validates every ref before its Authorizer sees one (Service.authorize); the dry
		// run does the same, or it would allow what the broker refuses.
		if err := sref.Validate(); err != nil {
			fmt.Fprintf(e.stdout, "deny: %v\n", err)
			return errDenied
		}
		r, err := a.Authorize(context.Background(), id, sref)
		if err != nil {
			fmt.Fprintf(e.stdout, "deny: %v\n", err)
			return errDenied
		}
		fmt.Fprintf(e.stdout, "allow: %s\nreads Vault %s key %q (environment %s)\n", r.Reason, vaultPath(r), r.Key, r.Environment)
		return nil
	default:
		return fmt.Errorf("policy: unknown command %q: %w", args[0], errUsage)
	}
}

func isDefault(set *policy.Budget) string {
	if set == nil {
		return " (default)"
	}
	return ""
}

// checkDynamic is policy check --pki-role or --database-role: the credential of role ref.Ref, with
// the parts a volume's files would hold of it, validated as the broker validates refs, then allowed
// or denied.
func checkDynamic(e streams, a *policy.Authorizer, id broker.Identity, ref broker.SecretRef, parts []string) error {
	if ref.Kind == broker.KindPKI {
		// The policy does not look at the certificate asked for, but a pki ref is valid only with one.
		ref.PKI.CommonName = "policy-check.invalid"
	}
	var r broker.Resolved
	for _, part := range parts {
		ref.Key = part
		err := ref.Validate()
		if err == nil {
			r, err = a.Authorize(context.Background(), id, ref)
		}
		if err != nil {
			fmt.Fprintf(e.stdout, "deny: %v\n", err)
			return errDenied
		}
	}
	fmt.Fprintf(e.stdout, "allow: %s\nissues Vault %s (%s) (environment %s)\n", r.Reason, vaultPath(r), strings.Join(parts, ", "), r.Environment)
	return nil
}

// vaultPath is where Vault is asked for an allowed ref: a KV v2 secret's data, the PKI role's issue
// (or, the key made locally, sign) endpoint, the database role's creds.
func vaultPath(r broker.Resolved) string {
	switch r.Kind {
	case broker.KindPKI:
		if r.PKI.LocalKey {
			return r.Mount + "/sign/" + r.Path
		}
		return r.Mount + "/issue/" + r.Path
	case broker.KindDatabase:
		return r.Mount + "/creds/" + r.Path
	}
	return r.Mount + "/data/" + r.Path
}

// checkSecrets is policy check --secrets: the volume's list parsed as a publish parses it (an invalid
// entry is a deny, as the broker refuses it), then each ref and key it reads, one line each (the
// parts of one dynamic credential share a line). A publish needs them all: one deny denies the whole
// volume.
func checkSecrets(e streams, a *policy.Authorizer, id broker.Identity, path string) error {
	raw, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	refs, err := csi.SecretsRefs(string(raw))
	if err != nil {
		fmt.Fprintf(e.stdout, "deny: %v\n", err)
		return errDenied
	}
	return checkRefs(e, a, id, refs)
}

// credential is the refs of a volume that share one dynamic credential (same kind, role and
// certificate request), or a single KV ref.
type credential struct {
	refs  []broker.SecretRef
	parts []string
}

func (c credential) String() string {
	if !c.refs[0].Dynamic() {
		return c.refs[0].String()
	}
	return fmt.Sprintf("%s (%s)", broker.LeaseName(c.refs[0]), strings.Join(c.parts, ", "))
}

// checkRefs authorizes a volume's refs and prints one line for each KV ref and each dynamic
// credential.
func checkRefs(e streams, a *policy.Authorizer, id broker.Identity, refs []broker.SecretRef) error {
	var creds []*credential
	shared := map[broker.SecretRef]*credential{} // a dynamic credential's refs, keyed without their part
	for _, ref := range refs {
		if !ref.Dynamic() {
			creds = append(creds, &credential{refs: []broker.SecretRef{ref}})
			continue
		}
		k := ref
		k.Key = ""
		c, ok := shared[k]
		if !ok {
			c = &credential{}
			shared[k] = c
			creds = append(creds, c)
		}
		c.refs = append(c.refs, ref)
		c.parts = append(c.parts, ref.Key)
	}
	denied := false
	for _, c := range creds {
		var r broker.Resolved
		var err error
		for _, ref := range c.refs {
			if r, err = a.Authorize(context.Background(), id, ref); err != nil {
				break
			}
		}
		switch {
		case err != nil:
			denied = true
			fmt.Fprintf(e.stdout, "deny: %s: %v\n", c, err)
		case r.Dynamic():
			fmt.Fprintf(e.stdout, "allow: %s: %s; issues Vault %s (%s) (environment %s)\n", c, r.Reason, vaultPath(r), strings.Join(c.parts, ", "), r.Environment)
		default:
			fmt.Fprintf(e.stdout, "allow: %s: %s; reads Vault %s key %q (environment %s)\n", c, r.Reason, vaultPath(r), r.Key, r.Environment)
		}
	}
	if denied {
		return errDenied
	}
	return nil
}
