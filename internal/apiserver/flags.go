package apiserver

import (
	"flag"
	"strings"
)

// Bind registers the API flags both daemons take. The API is off unless --api-address is set.
func (o *Options) Bind(fs *flag.FlagSet) {
	fs.StringVar(&o.Address, "api-address", "", "serve Keyward's API (AuditStream, Admin; gRPC over TLS 1.3 with client certificates) on this TCP address, e.g. :9443 (empty: off)")
	fs.StringVar(&o.CertFile, "api-tls-cert", "", "the API's server certificate (PEM); read again when it changes")
	fs.StringVar(&o.KeyFile, "api-tls-key", "", "the API server certificate's key (PEM)")
	fs.StringVar(&o.ClientCAFile, "api-client-ca", "", "CA (PEM) client certificates must chain to; dedicate a CA to this API: every certificate it signs reaches the allow-lists")
	list := func(dst *[]string) func(string) error {
		return func(s string) error { *dst = SplitList(s); return nil }
	}
	fs.Func("api-audit-readers", "client certificates allowed to subscribe to the audit stream, comma-separated (or '|'-separated, for distinguished names): uri:U a SAN URI (SPIFFE ID), dns:D a SAN DNS name, an entry with '=' the whole distinguished name (CN=x,O=y), else the common name", list(&o.AuditReaders))
	fs.Func("api-admins", "client certificates allowed to call the read-only Admin service (same form as --api-audit-readers)", list(&o.Admins))
}

// String is the allow-lists as flags would give them, for a start-up log line.
func (o Options) String() string {
	return "address=" + o.Address + " audit-readers=" + strings.Join(o.AuditReaders, "|") + " admins=" + strings.Join(o.Admins, "|")
}
