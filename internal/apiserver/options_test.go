package apiserver

import (
	"flag"
	"slices"
	"strings"
	"testing"
)

// The API is off unless an address is given; on, it needs its TLS files and at least one list.
func TestOptionsAndFlags(t *testing.T) {
	var o Options
	fs := flag.NewFlagSet("x", flag.ContinueOnError)
	o.Bind(fs)
	if err := fs.Parse(nil); err != nil || o.Enabled() || o.Validate() != nil {
		t.Fatalf("default: %+v %v", o, o.Validate())
	}
	if err := fs.Parse([]string{"--api-address", ":9443"}); err != nil || !o.Enabled() || o.Validate() == nil {
		t.Fatalf("an address without TLS files passed: %v", o.Validate())
	}
	fs.Parse([]string{"--api-tls-cert", "c", "--api-tls-key", "k", "--api-client-ca", "ca"})
	if err := o.Validate(); err == nil || !strings.Contains(err.Error(), "--api-audit-readers or --api-admins") {
		t.Fatalf("no allow-list: %v", err)
	}
	fs.Parse([]string{"--api-audit-readers", "sec-team, siem", "--api-admins", "CN=op,O=x|CN=op2,O=y"})
	if err := o.Validate(); err != nil || !slices.Equal(o.AuditReaders, []string{"sec-team", "siem"}) || !slices.Equal(o.Admins, []string{"CN=op,O=x", "CN=op2,O=y"}) {
		t.Fatalf("%+v %v", o, err)
	}
	o.Address = "9443"
	if o.Validate() == nil {
		t.Fatal("an address without a port passed")
	}
}
