package apiserver

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	"github.com/keyward/keyward/internal/apiserver/apitest"
	"github.com/keyward/keyward/internal/audit"
	adminv1 "github.com/keyward/keyward/proto/keyward/admin/v1"
	auditv1 "github.com/keyward/keyward/proto/keyward/audit/v1"
)

// firstErr is the first error of a subscription (its first Recv).
func firstErr(st grpc.ServerStreamingClient[auditv1.SubscribeResponse], err error) error {
	if err != nil {
		return err
	}
	_, err = st.Recv()
	return err
}

// Only clients with a certificate from the API's CA whose subject is on the service's list get in:
// none, or one from another CA, fails the handshake; one not on the list (or on the other service's
// list, or whose common name spells a listed distinguished name) is PermissionDenied; TLS 1.2 is
// refused.
func TestClientCertificatesAndAllowLists(t *testing.T) {
	e := newEnv(t, 1<<20, 10)
	l := e.open()
	defer l.Close()
	record(t, l, 3)
	addr, _ := e.serve(l, AuditOptions{}, AdminOptions{Node: "node-a", Component: "broker"})
	stranger, strangerKey := e.pki.Client("stranger")
	op, opKey := e.pki.Client("operator")
	rogue := apitest.New(t, t.TempDir())
	rogueCert, rogueKey := rogue.Client("security-team") // the right name, the wrong CA
	dnAsCN, dnAsCNKey := e.pki.ClientWithSANs("dn-as-cn", "CN=operator,O=keyward-test", nil, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()

	subscribe := func(cc *grpc.ClientConn) error {
		return firstErr(auditv1.NewAuditStreamClient(cc).Subscribe(ctx, &auditv1.SubscribeRequest{}))
	}
	health := func(cc *grpc.ClientConn) error {
		_, err := adminv1.NewAdminClient(cc).GetHealth(ctx, &adminv1.GetHealthRequest{})
		return err
	}
	for _, c := range []struct {
		name       string
		cc         *grpc.ClientConn
		audit, adm codes.Code
	}{
		// Refused at the handshake (RequireAndVerifyClientCert): it never reaches HTTP/2.
		{"no certificate", e.dial(addr, "", ""), codes.Unavailable, codes.Unavailable},
		{"not on a list", e.dial(addr, stranger, strangerKey), codes.PermissionDenied, codes.PermissionDenied},
		{"audit reader", e.dial(addr, e.readerC[0], e.readerC[1]), codes.OK, codes.PermissionDenied},
		{"admin (by distinguished name)", e.dial(addr, op, opKey), codes.PermissionDenied, codes.OK},
		{"another CA", e.dial(addr, rogueCert, rogueKey), codes.Unavailable, codes.Unavailable},
		// A common name that reads like the admins' distinguished name is not that name.
		{"a common name spelling the admin's DN", e.dial(addr, dnAsCN, dnAsCNKey), codes.PermissionDenied, codes.PermissionDenied},
	} {
		if got := status.Code(subscribe(c.cc)); got != c.audit {
			t.Errorf("%s: Subscribe: %v, want %v", c.name, got, c.audit)
		}
		if got := status.Code(health(c.cc)); got != c.adm {
			t.Errorf("%s: GetHealth: %v, want %v", c.name, got, c.adm)
		}
	}
	// TLS 1.2 is refused at the handshake.
	pem, _ := os.ReadFile(e.pki.CAFile)
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(pem)
	kp, _ := tls.LoadX509KeyPair(e.readerC[0], e.readerC[1])
	conn, err := tls.Dial("tcp", addr, &tls.Config{RootCAs: pool, Certificates: []tls.Certificate{kp}, MaxVersion: tls.VersionTLS12})
	if err == nil {
		conn.Close()
		t.Error("a TLS 1.2 handshake succeeded")
	}
}

// A subscriber that stops taking records never holds up the writer: records go on being written at
// full speed, and the subscriber, cut after the stall timeout, gets ResourceExhausted naming where
// to resume; it has every record before that, and resuming there gets the rest.
func TestSlowSubscriberNeverBlocksWritersAndIsToldWhereToResume(t *testing.T) {
	e := newEnv(t, 256<<10, 1000)
	l := e.open()
	defer l.Close()
	addr, _ := e.serve(l, AuditOptions{Buffer: 8, Stall: 300 * time.Millisecond}, AdminOptions{})
	ctx := context.Background()
	cli := auditv1.NewAuditStreamClient(e.dial(addr, e.readerC[0], e.readerC[1]))
	st, err := cli.Subscribe(ctx, &auditv1.SubscribeRequest{})
	if err != nil {
		t.Fatal(err)
	}
	sub := newSubscriber(e.key)
	if err := sub.take(st, 1); err != nil { // subscribed: the genesis arrived
		t.Fatal(err)
	}
	// Baseline: the same writes with nobody subscribed, on another stream.
	e2 := newEnv(t, 256<<10, 1000)
	l2 := e2.open()
	start := time.Now()
	record(t, l2, 20000)
	alone := time.Since(start)
	l2.Close()
	start = time.Now()
	record(t, l, 20000) // the subscriber reads nothing meanwhile
	withSlow := time.Since(start)
	t.Logf("20000 records: %v alone, %v with a stalled subscriber", alone, withSlow)
	if withSlow > 3*alone+2*time.Second {
		t.Errorf("the writer slowed down with a stalled subscriber: %v, alone %v", withSlow, alone)
	}
	time.Sleep(time.Second) // the stall timeout passes with the buffer full
	err = sub.take(st, head(l))
	if status.Code(err) != codes.ResourceExhausted {
		t.Fatalf("a stalled subscriber got %v, want ResourceExhausted", err)
	}
	m := regexp.MustCompile(`resume with from_seq (\d+)`).FindStringSubmatch(status.Convert(err).Message())
	if m == nil {
		t.Fatalf("the error does not say where to resume: %v", err)
	}
	resume, _ := strconv.ParseUint(m[1], 10, 64)
	if got := sub.next(); resume > got || resume+1 < got {
		t.Fatalf("told to resume at %d, but received up to %d", resume, got-1)
	}
	t.Logf("cut after record %d of %d: %s", sub.next()-1, head(l), status.Convert(err).Message())
	// Resume there (again after each cut: under load this test's own subscriber, verifying every
	// MAC, can be slower than the 300 ms stall timeout).
	for cuts := 0; ; cuts++ {
		st, err = cli.Subscribe(ctx, &auditv1.SubscribeRequest{Start: from(sub.next())})
		if err != nil {
			t.Fatal(err)
		}
		err = sub.take(st, head(l))
		if err == nil {
			break
		}
		if status.Code(err) != codes.ResourceExhausted || cuts > 100 {
			t.Fatal(err)
		}
	}
	for seq := uint64(1); seq <= head(l); seq++ {
		if sub.seen[seq] != 1 {
			t.Fatalf("record %d received %d times", seq, sub.seen[seq])
		}
	}
}

// A start (or a resume) older than the oldest record on disk is OutOfRange naming the oldest; one
// beyond the head is OutOfRange too; a checkpoint of another chain is FailedPrecondition, and a
// matching one resumes right after it.
func TestStartsOutsideTheDiskAndCheckpoints(t *testing.T) {
	e := newEnv(t, 4096, 2)
	l := e.open()
	defer l.Close()
	record(t, l, 200)
	deadline := time.Now().Add(10 * time.Second)
	for segments(t, e.opts.Dir) > 2 && time.Now().Before(deadline) { // pruned once a sync ran
		time.Sleep(10 * time.Millisecond)
	}
	waitDurable(t, l, e.written())
	names, _ := filepath.Glob(filepath.Join(e.opts.Dir, "audit-*.jsonl"))
	oldest, _ := strconv.ParseUint(strings.TrimSuffix(strings.TrimPrefix(filepath.Base(names[0]), "audit-"), ".jsonl"), 10, 64)
	if oldest <= 1 || len(names) > 2 {
		t.Fatalf("not pruned: %d segments, the oldest from %d", len(names), oldest)
	}
	addr, _ := e.serve(l, AuditOptions{}, AdminOptions{})
	cli := auditv1.NewAuditStreamClient(e.dial(addr, e.readerC[0], e.readerC[1]))
	ctx := context.Background()
	err := firstErr(cli.Subscribe(ctx, &auditv1.SubscribeRequest{Start: from(1)}))
	m := regexp.MustCompile(`resume with from_seq (\d+)`).FindStringSubmatch(status.Convert(err).Message())
	if status.Code(err) != codes.OutOfRange || m == nil {
		t.Fatalf("pruned start: %v (oldest on disk %d)", err, oldest)
	}
	if named, _ := strconv.ParseUint(m[1], 10, 64); named < oldest { // a later prune may have moved it on
		t.Fatalf("pruned start: told to resume at %d, the oldest on disk is %d", named, oldest)
	}
	if err := firstErr(cli.Subscribe(ctx, &auditv1.SubscribeRequest{Start: from(head(l) + 5)})); status.Code(err) != codes.OutOfRange {
		t.Fatalf("start beyond the head: %v", err)
	}
	if err := firstErr(cli.Subscribe(ctx, &auditv1.SubscribeRequest{Stream: "kms"})); status.Code(err) != codes.NotFound {
		t.Fatalf("another stream: %v", err)
	}
	// The oldest on disk is a segment header: a subscriber starts there, trusting its prev_mac.
	st, err := cli.Subscribe(ctx, &auditv1.SubscribeRequest{CheckpointEvery: 3})
	if err != nil {
		t.Fatal(err)
	}
	sub := newSubscriber(e.key)
	var cp *auditv1.Checkpoint
	for cp == nil {
		m, err := st.Recv()
		if err != nil {
			t.Fatal(err)
		}
		if m.GetCheckpoint() != nil {
			cp = m.GetCheckpoint()
			break
		}
		r := m.GetRecord()
		if err := sub.v.Record(r.GetLine(), fmt.Sprintf("audit-%020d.jsonl", r.GetSeq()) == r.GetSegment()); err != nil {
			t.Fatal(err)
		}
	}
	bad := proto.Clone(cp).(*auditv1.Checkpoint)
	bad.Mac = strings.Repeat("0", 64)
	err = firstErr(cli.Subscribe(ctx, &auditv1.SubscribeRequest{Start: &auditv1.SubscribeRequest_FromCheckpoint{FromCheckpoint: bad}}))
	if status.Code(err) != codes.FailedPrecondition {
		t.Fatalf("a checkpoint of another chain: %v", err)
	}
	st, err = cli.Subscribe(ctx, &auditv1.SubscribeRequest{Start: &auditv1.SubscribeRequest_FromCheckpoint{FromCheckpoint: cp}})
	if err != nil {
		t.Fatal(err)
	}
	resumed := newSubscriber(e.key)
	resumed.v.Resume(cp.GetSeq(), cp.GetMac())
	if err := resumed.take(st, head(l)); err != nil {
		t.Fatal(err)
	}
	if resumed.seen[cp.GetSeq()] != 0 || resumed.seen[cp.GetSeq()+1] != 1 {
		t.Fatalf("resumed from checkpoint %d: %v", cp.GetSeq(), resumed.seen[cp.GetSeq()+1])
	}
}

// A filter sends the records it does not select elided (seq and mac only): the subscriber still
// verifies the whole chain, and gets only the selected records' lines.
func TestFilteredSubscriptionStillVerifies(t *testing.T) {
	e := newEnv(t, 1<<20, 10)
	l := e.open()
	defer l.Close()
	record(t, l, 40)
	waitDurable(t, l, 41)
	addr, _ := e.serve(l, AuditOptions{}, AdminOptions{})
	cli := auditv1.NewAuditStreamClient(e.dial(addr, e.readerC[0], e.readerC[1]))
	st, err := cli.Subscribe(context.Background(), &auditv1.SubscribeRequest{Filter: &auditv1.Filter{Namespace: "other"}})
	if err != nil {
		t.Fatal(err)
	}
	sub := newSubscriber(e.key)
	full := 0
	for seq := uint64(0); seq < 41; {
		m, err := st.Recv()
		if err != nil {
			t.Fatal(err)
		}
		r := m.GetRecord()
		if r == nil {
			continue
		}
		seq = r.GetSeq()
		if len(r.GetLine()) > 0 {
			full++
			var rec audit.Record
			json.Unmarshal(r.GetLine(), &rec)
			if rec.Type != audit.EventAuditGenesis && rec.Subject.Namespace != "other" {
				t.Errorf("record %d of namespace %q sent whole", seq, rec.Subject.Namespace)
			}
			err = sub.v.Record(r.GetLine(), seq == 1)
		} else {
			err = sub.v.Elided(seq, r.GetMac())
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	if full != 1+10 {
		t.Errorf("%d whole records, want the genesis and 10", full)
	}
	// A forged elided MAC is caught by the next whole record.
	forged := newSubscriber(e.key)
	forged.v.Resume(1, strings.Repeat("ab", 32))
	if err := forged.v.Elided(2, strings.Repeat("cd", 32)); err != nil {
		t.Fatal(err)
	}
	b, _ := audit.ReadAll(e.opts.Dir)
	lines := strings.Split(string(b), "\n")
	if err := forged.v.Record([]byte(lines[2]), false); !errors.Is(err, audit.ErrTampered) {
		t.Fatalf("a forged elided mac passed: %v", err)
	}
}

// The Admin service answers what its sources say and nothing else: no secret value, token,
// accessor or PIN reaches an answer, whatever the sources hold behind those fields.
func TestAdminAnswersCarryNoSecrets(t *testing.T) {
	e := newEnv(t, 1<<20, 10)
	l := e.open()
	defer l.Close()
	const canary = "CANARY-s3cr3t-hvs.TOKEN"
	admin := AdminOptions{Node: "node-a", Component: "broker", Version: "test",
		Volumes: func() []Volume {
			return []Volume{{ID: "csi-1", Namespace: "payments", Pod: "api-0", PodUID: "uid-1", ServiceAccount: "api", Environment: "prod",
				Refs: map[string]int{"payments/db#password": 7}, Version: 2, Since: time.Now().Add(-time.Hour), LastAt: time.Now(),
				Leases: []Lease{{Name: "database:payments_ro", SHA256: "01a024f2f759400f", TTL: time.Hour, Expires: time.Now().Add(time.Hour)}}}}
		},
		VaultTokens: func() (string, []VaultToken) {
			return "pod", []VaultToken{{AccessorSHA256: "0a1b2c3d4e5f", Namespace: "payments", ServiceAccount: "api", Role: "prod",
				Environment: "prod", Issued: time.Now(), TTL: time.Hour, Renewable: true, Holders: 2}}
		},
		Policy: func() (uint64, string) { return 3, "abc123" },
		Health: func() []Check {
			return []Check{{Name: "audit"}, {Name: "namespaces", Err: errors.New("namespace informer not synced")}}
		},
	}
	addr, _ := e.serve(l, AuditOptions{}, admin)
	op, opKey := e.pki.Client("operator")
	cli := adminv1.NewAdminClient(e.dial(addr, op, opKey))
	ctx := context.Background()
	vols, err := cli.ListVolumes(ctx, &adminv1.ListVolumesRequest{})
	if err != nil || len(vols.GetVolumes()) != 1 || vols.GetVolumes()[0].GetRefs()[0].GetVaultVersion() != 7 {
		t.Fatalf("ListVolumes: %v %v", vols, err)
	}
	if ls := vols.GetVolumes()[0].GetLeases(); len(ls) != 1 || ls[0].GetName() != "database:payments_ro" || ls[0].GetLeaseSha256() != "01a024f2f759400f" ||
		ls[0].GetTtl().AsDuration() != time.Hour {
		t.Fatalf("ListVolumes leases: %v", ls)
	}
	toks, err := cli.ListVaultTokens(ctx, &adminv1.ListVaultTokensRequest{})
	if err != nil || len(toks.GetTokens()) != 1 || toks.GetTokens()[0].GetTtl().AsDuration() != time.Hour {
		t.Fatalf("ListVaultTokens: %v %v", toks, err)
	}
	pol, err := cli.GetPolicy(ctx, &adminv1.GetPolicyRequest{})
	if err != nil || pol.GetGeneration() != 3 || pol.GetHash() != "abc123" {
		t.Fatalf("GetPolicy: %v %v", pol, err)
	}
	h, err := cli.GetHealth(ctx, &adminv1.GetHealthRequest{})
	if err != nil || h.GetHealthy() || len(h.GetChecks()) != 2 || h.GetChecks()[1].GetReason() != "namespace informer not synced" {
		t.Fatalf("GetHealth: %v %v", h, err)
	}
	for _, m := range []proto.Message{vols, toks, pol, h} {
		if js := protojson.Format(m); strings.Contains(js, canary) {
			t.Errorf("an answer carries the canary: %s", js)
		}
	}
	// keyward-kms wires no volume source: Unimplemented, not an empty list.
	addr2, _ := e.serve(l, AuditOptions{}, AdminOptions{Node: "node-a", Component: "kms"})
	if _, err := adminv1.NewAdminClient(e.dial(addr2, op, opKey)).ListVolumes(ctx, &adminv1.ListVolumesRequest{}); status.Code(err) != codes.Unimplemented {
		t.Fatalf("ListVolumes without a source: %v", err)
	}
	_ = credentials.TLSInfo{}
}

// A rotated server certificate (the files replaced, as cert-manager or a Secret update does) serves
// the next connection without a restart.
func TestServerCertificateRotates(t *testing.T) {
	e := newEnv(t, 1<<20, 10)
	l := e.open()
	defer l.Close()
	addr, _ := e.serve(l, AuditOptions{}, AdminOptions{})
	pem, _ := os.ReadFile(e.pki.CAFile)
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(pem)
	serial := func() string {
		c, err := tls.Dial("tcp", addr, &tls.Config{RootCAs: pool, ServerName: "localhost", MinVersion: tls.VersionTLS13})
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		return c.ConnectionState().PeerCertificates[0].SerialNumber.String()
	}
	before := serial()
	cert, key := e.pki.Server("keyward-api-rotated")
	for _, f := range [][2]string{{cert, e.pki.ServerCert}, {key, e.pki.ServerKey}} {
		b, _ := os.ReadFile(f[0])
		if err := os.WriteFile(f[1], b, 0o600); err != nil {
			t.Fatal(err)
		}
		later := time.Now().Add(time.Second) // a modification time the server has not seen
		os.Chtimes(f[1], later, later)
	}
	if after := serial(); after == before {
		t.Fatalf("still serving certificate %s after the rotation", before)
	}
}

// Each allow-list form matches one certificate field only: "uri:" a SAN URI (SPIFFE IDs), "dns:" a
// SAN DNS name, an entry with "=" the whole DN, any other the common name; no field passes for
// another.
func TestAllowListEntries(t *testing.T) {
	e := newEnv(t, 1<<20, 10)
	const spiffe = "spiffe://example.org/ns/security/sa/follow"
	certs := map[string][2]string{}
	for name, c := range map[string]struct {
		cn         string
		uris, dnss []string
	}{
		"spiffe":       {cn: "someone", uris: []string{spiffe}},
		"dns":          {cn: "someone", dnss: []string{"reader.example.org"}},
		"cn-is-uri":    {cn: "uri:" + spiffe},
		"cn-is-dns":    {cn: "dns:reader.example.org"},
		"cn-is-dn":     {cn: "CN=operator,O=keyward-test"},
		"operator":     {cn: "operator"},
		"other-spiffe": {cn: "someone", uris: []string{spiffe + "-2"}},
	} {
		cert, key := e.pki.ClientWithSANs(name, c.cn, c.uris, c.dnss)
		certs[name] = [2]string{cert, key}
	}
	parse := func(name string) *x509.Certificate {
		kp, err := tls.LoadX509KeyPair(certs[name][0], certs[name][1])
		if err != nil {
			t.Fatal(err)
		}
		c, _ := x509.ParseCertificate(kp.Certificate[0])
		return c
	}
	for _, c := range []struct {
		entry, cert string
		want        bool
	}{
		{"uri:" + spiffe, "spiffe", true},
		{"uri:" + spiffe, "other-spiffe", false},
		{"uri:" + spiffe, "cn-is-uri", false}, // the common name is not a SAN
		{spiffe, "spiffe", false},             // a plain entry is a common name only
		{"dns:reader.example.org", "dns", true},
		{"dns:READER.example.org", "dns", true},
		{"dns:reader.example.org", "cn-is-dns", false},
		{"CN=operator,O=keyward-test", "operator", true},
		{"CN=operator,O=keyward-test", "cn-is-dn", false}, // was allowed: its CN equals the entry
		{"operator", "operator", true},
		{"operator", "cn-is-dn", false},
	} {
		if got := Allowed(c.entry, parse(c.cert)); got != c.want {
			t.Errorf("Allowed(%q, %s) = %v, want %v", c.entry, c.cert, got, c.want)
		}
	}

	// Through the server: uri: and dns: entries let those certificates subscribe.
	l := e.open()
	defer l.Close()
	srv, err := Listen(Options{Address: "127.0.0.1:0", CertFile: e.pki.ServerCert, KeyFile: e.pki.ServerKey, ClientCAFile: e.pki.CAFile,
		AuditReaders: []string{"uri:" + spiffe, "dns:reader.example.org"}, Admins: []string{"CN=operator,O=keyward-test"}}, zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	as, _ := NewAuditServer(AuditOptions{Stream: l})
	as.Register(srv.GRPC)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx, time.Second) }()
	defer func() { cancel(); <-done }()
	for name, want := range map[string]codes.Code{"spiffe": codes.OK, "dns": codes.OK, "cn-is-uri": codes.PermissionDenied, "cn-is-dn": codes.PermissionDenied} {
		cc := e.dial(srv.Addr().String(), certs[name][0], certs[name][1])
		sctx, scancel := context.WithTimeout(ctx, 20*time.Second)
		err := firstErr(auditv1.NewAuditStreamClient(cc).Subscribe(sctx, &auditv1.SubscribeRequest{}))
		scancel()
		if got := status.Code(err); got != want {
			t.Errorf("%s: Subscribe: %v, want %v", name, err, want)
		}
	}
	if err := (Options{Address: ":9443", CertFile: "c", KeyFile: "k", ClientCAFile: "ca", AuditReaders: []string{"uri:"}}).Validate(); err == nil {
		t.Error("an empty uri: entry validated")
	}
}
