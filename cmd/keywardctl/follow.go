package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/keyward/keyward/internal/apiserver"
	"github.com/keyward/keyward/internal/audit"
	auditv1 "github.com/keyward/keyward/proto/keyward/audit/v1"
)

// followState is what --state keeps between runs: the last record verified (a whole record whose
// MAC was checked here; never an elided one, which the server alone vouches for).
type followState struct {
	Node   string `json:"node"`
	Stream string `json:"stream"`
	Seq    uint64 `json:"seq"`
	MAC    string `json:"mac"`
}

// auditFollow is the reference subscriber of a node's AuditStream: it prints each record as written,
// verifies the chain as it goes (the daemon is not trusted for that), resumes after a disconnect, a
// daemon restart or a cut from its own last verified record, and fails on a gap or a MAC that does
// not verify.
func auditFollow(e streams, args []string) error {
	fs := newFlags("audit follow", e)
	var a apiFlags
	a.bind(fs, false)
	keyFile := fs.String("key-file", "", "file holding the node's audit HMAC key")
	masterFile := fs.String("master-key-file", "", "file holding the master key node keys are derived from (instead of --key-file)")
	stream := fs.String("stream", "broker", "the stream: broker (the DaemonSet) or kms (keyward-kms; give its --addr)")
	fromSeq := fs.Uint64("from-seq", 0, "the first record to read (0: the oldest on disk); ignored when --state holds a position")
	fromMAC := fs.String("from-mac", "", "with --from-seq N: the MAC (hex) of record N-1, which the chain continues from (from audit verify, a checkpoint or a record kept); needed unless N is 1 or begins a segment")
	stateFile := fs.String("state", "", "file keeping the last verified record (seq and mac; never an elided one): a later run resumes right after it, with the chain checked across")
	until := fs.Uint64("until-seq", 0, "exit 0 once this record is verified (0: follow until interrupted); with a filter, a record that arrives elided is verified only by a whole record after it")
	retry := fs.Duration("retry", 2*time.Minute, "how long to keep reconnecting to a daemon that is unavailable (restarting) before failing")
	output := fs.String("o", "json", "json: each record's line as written; none: verify only")
	var f auditv1.Filter
	fs.Func("event", "only these event types in full (comma-separated); others arrive elided (seq and mac) and the chain is still verified", func(s string) error {
		f.Events = strings.Split(s, ",")
		return nil
	})
	fs.Func("decision", "only these decisions in full (allow, deny, error; comma-separated)", func(s string) error {
		f.Decisions = strings.Split(s, ",")
		return nil
	})
	fs.StringVar(&f.Namespace, "namespace", "", "only records of pods of this namespace in full")
	if _, err := parse(fs, args); err != nil {
		return err
	}
	if a.node == "" {
		return fmt.Errorf("audit follow needs --node: the chain is bound to its node: %w", errUsage)
	}
	if *output != "json" && *output != "none" {
		return fmt.Errorf("-o %q: want json or none: %w", *output, errUsage)
	}
	if *fromMAC != "" && *fromSeq < 2 {
		return fmt.Errorf("--from-mac is the MAC of the record before --from-seq N (N > 1): %w", errUsage)
	}
	key, err := verifyKey(*keyFile, *masterFile, a.node)
	if err != nil {
		return err
	}
	ctx, stop := followContext()
	defer stop()
	fl := &follower{e: e, a: &a, stream: *stream, keyID: audit.KeyID(key), v: audit.NewChainVerifier(audit.VerifyOptions{Key: key, Node: a.node, Stream: *stream}),
		stateFile: *stateFile, until: *until, print: *output == "json", filter: &f, next: *fromSeq}
	if err := fl.loadState(); err != nil {
		return err
	}
	if fl.next == *fromSeq && *fromMAC != "" { // no --state position: resume from the given MAC
		if err := fl.v.Resume(*fromSeq-1, *fromMAC); err != nil {
			return fmt.Errorf("--from-mac: %v: %w", err, errUsage)
		}
	}
	err = fl.run(ctx, *retry)
	if serr := fl.saveState(); err == nil {
		err = serr
	}
	if err != nil && ctx.Err() != nil { // interrupted
		if errors.Is(err, audit.ErrTampered) {
			return err
		}
		fmt.Fprintf(e.stderr, "keywardctl: stopped after record %d, verified%s\n", fl.last(), fl.unverified())
		return nil
	}
	return err
}

// followContext ends follow on SIGINT or SIGTERM (a variable: tests end it themselves).
var followContext = func() (context.Context, context.CancelFunc) {
	return signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
}

type follower struct {
	e         streams
	a         *apiFlags
	stream    string
	keyID     string // of the node's key: checkpoints must name it
	v         *audit.ChainVerifier
	stateFile string
	until     uint64
	print     bool
	filter    *auditv1.Filter
	next      uint64 // the next record to ask for (0: the oldest on disk)
	records   uint64 // records received by the current subscription
	ever      bool   // any subscription received records
}

// last is the last record verified (elided records after it are not, until a whole one proves them).
func (fl *follower) last() uint64 { seq, _ := fl.v.Verified(); return seq }

// unverified says which records after the last verified one arrived elided, unproven.
func (fl *follower) unverified() string {
	if head, _ := fl.v.Head(); head > fl.last() {
		return fmt.Sprintf("; records %d..%d arrived elided and are not verified (no whole record after them)", fl.last()+1, head)
	}
	return ""
}

func (fl *follower) loadState() error {
	if fl.stateFile == "" {
		return nil
	}
	b, err := os.ReadFile(fl.stateFile)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	var st followState
	if err := json.Unmarshal(b, &st); err != nil {
		return fmt.Errorf("--state %s: %w", fl.stateFile, err)
	}
	if st.Node != fl.a.node || st.Stream != fl.stream {
		return fmt.Errorf("--state %s is node %s's %q stream, not node %s's %q", fl.stateFile, st.Node, st.Stream, fl.a.node, fl.stream)
	}
	if err := fl.v.Resume(st.Seq, st.MAC); err != nil {
		return err
	}
	fl.next = st.Seq + 1
	return nil
}

// saveState writes the last verified record, atomically: a later run resumes after it, so elided
// records after it are asked for again and proven by the whole record that follows them.
func (fl *follower) saveState() error {
	seq, mac := fl.v.Verified()
	if fl.stateFile == "" || seq == 0 {
		return nil
	}
	b, _ := json.Marshal(followState{Node: fl.a.node, Stream: fl.stream, Seq: seq, MAC: mac})
	tmp := filepath.Join(filepath.Dir(fl.stateFile), "."+filepath.Base(fl.stateFile)+".tmp")
	if err := os.WriteFile(tmp, append(b, '\n'), 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, fl.stateFile)
}

var resumeAt = regexp.MustCompile(`resume with from_seq (\d+)`)

// run subscribes and resubscribes until the until record, an interruption, or an error that no
// resubscription can mend (a gap, a record that does not verify, a refusal).
func (fl *follower) run(ctx context.Context, retry time.Duration) error {
	failingSince := time.Time{}
	backoff := 100 * time.Millisecond
	for {
		fl.records = 0
		err := fl.subscribe(ctx)
		if err == nil || ctx.Err() != nil {
			return err
		}
		if fl.records > 0 { // it made progress: a fresh outage
			failingSince, backoff = time.Time{}, 100*time.Millisecond
		}
		st, isStatus := status.FromError(err)
		switch {
		case errors.Is(err, audit.ErrTampered), errors.Is(err, errUsage):
			return fmt.Errorf("node %s's %s stream after record %d verified: %w", fl.a.node, fl.stream, fl.last(), err)
		case isStatus && st.Code() == codes.OutOfRange:
			if m := resumeAt.FindStringSubmatch(st.Message()); m != nil && fl.next > 0 {
				oldest, _ := strconv.ParseUint(m[1], 10, 64)
				return fmt.Errorf("gap: records %d..%d of node %s's %s stream were deleted on the node before they were read (%s)", fl.next, oldest-1, fl.a.node, fl.stream, st.Message())
			}
			return fmt.Errorf("node %s: %s", fl.a.node, st.Message())
		case isStatus && (st.Code() == codes.Unavailable || st.Code() == codes.ResourceExhausted || st.Code() == codes.Canceled || st.Code() == codes.DeadlineExceeded):
			// A restart, a cut, a connection lost: resume from our own last verified record.
		case !isStatus && fl.ever:
			// Finding the node failed (the apiserver, or the pod being replaced): retry too.
		default:
			return fmt.Errorf("node %s: %w", fl.a.node, err)
		}
		if failingSince.IsZero() {
			failingSince = time.Now()
		}
		if time.Since(failingSince) > retry {
			return fmt.Errorf("node %s unavailable for %s (last record verified %d): %w", fl.a.node, retry, fl.last(), err)
		}
		fmt.Fprintf(fl.e.stderr, "keywardctl: node %s: %s; resuming at record %d (verified up to %d)\n", fl.a.node, status.Convert(err).Message(), fl.next, fl.last())
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, 5*time.Second)
	}
}

// subscribe runs one subscription; it returns nil once the until record is verified.
func (fl *follower) subscribe(ctx context.Context) error {
	ts, err := fl.a.targets(ctx)
	if err != nil {
		return err
	}
	cc, err := fl.a.dial(ts[0])
	if err != nil {
		return err
	}
	defer cc.Close()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	req := &auditv1.SubscribeRequest{Stream: fl.stream, Filter: fl.filter}
	if fl.next > 0 {
		req.Start = &auditv1.SubscribeRequest_FromSeq{FromSeq: fl.next}
	}
	sub, err := auditv1.NewAuditStreamClient(cc).Subscribe(ctx, req)
	if err != nil {
		return err
	}
	asked := fl.next
	for {
		m, err := sub.Recv()
		if err != nil {
			return err
		}
		if cp := m.GetCheckpoint(); cp != nil {
			if err := fl.checkpoint(cp); err != nil {
				return err
			}
			if err := fl.saveState(); err != nil {
				return err
			}
			continue
		}
		r := m.GetRecord()
		if fl.records == 0 && asked > 0 && r.GetSeq() != asked {
			return fmt.Errorf("%w: asked for records from %d, the daemon sent record %d first", audit.ErrTampered, asked, r.GetSeq())
		}
		begins, _ := fl.v.Head()
		if begins == 0 && asked > 1 && fmt.Sprintf("audit-%020d.jsonl", r.GetSeq()) != r.GetSegment() {
			return fmt.Errorf("--from-seq %d is in the middle of segment %s: give --from-mac, the MAC of record %d, to continue the chain from it (a segment's first record or 1 needs none): %w",
				asked, r.GetSegment(), asked-1, errUsage)
		}
		if len(r.GetLine()) == 0 {
			err = fl.v.Elided(r.GetSeq(), r.GetMac())
		} else {
			err = fl.v.Record(r.GetLine(), fmt.Sprintf("audit-%020d.jsonl", r.GetSeq()) == r.GetSegment())
		}
		if err != nil {
			return err
		}
		if begins == 0 && asked > 1 {
			fmt.Fprintf(fl.e.stderr, "keywardctl: node %s's %s stream from record %d, the first of %s: its header's link to record %d is taken as given\n",
				fl.a.node, fl.stream, r.GetSeq(), r.GetSegment(), r.GetSeq()-1)
		} else if begins == 0 && r.GetSeq() > 1 {
			fmt.Fprintf(fl.e.stderr, "keywardctl: node %s's %s stream starts at record %d on disk: records 1..%d were deleted there (the segment header's link to them is taken as given)\n",
				fl.a.node, fl.stream, r.GetSeq(), r.GetSeq()-1)
		}
		fl.next, fl.records, fl.ever = r.GetSeq()+1, fl.records+1, true
		// A record a checkpoint names arrives whole even if the filter does not select it: printed
		// only if selected.
		if fl.print && len(r.GetLine()) > 0 && apiserver.Selects(fl.filter, r.GetLine()) {
			if _, err := fmt.Fprintf(fl.e.stdout, "%s\n", r.GetLine()); err != nil {
				return err
			}
		}
		if fl.until > 0 && fl.last() >= fl.until { // verified: an elided record is not
			return nil
		}
	}
}

// checkpoint checks a checkpoint of the stream: it must be of the node, stream and key asked for,
// and name the last record, verified here (a checkpoint never names an elided record).
func (fl *follower) checkpoint(cp *auditv1.Checkpoint) error {
	switch {
	case cp.GetNode() != fl.a.node || cp.GetStream() != fl.stream:
		return fmt.Errorf("%w: the daemon's checkpoint is node %q's %q stream, not node %q's %q", audit.ErrTampered, cp.GetNode(), cp.GetStream(), fl.a.node, fl.stream)
	case cp.GetKeyId() != fl.keyID:
		return fmt.Errorf("%w: the daemon's checkpoint names key %s, the node's key is %s", audit.ErrTampered, cp.GetKeyId(), fl.keyID)
	}
	head, _ := fl.v.Head()
	seq, mac := fl.v.Verified()
	switch {
	case cp.GetSeq() == head && head != seq:
		return fmt.Errorf("%w: the daemon's checkpoint names record %d, which it sent elided (unverified; the last record verified is %d)", audit.ErrTampered, cp.GetSeq(), seq)
	case cp.GetSeq() != seq || cp.GetMac() != mac:
		return fmt.Errorf("%w: the daemon's checkpoint names record %d with mac %s, the chain verified here is at %d with %s", audit.ErrTampered, cp.GetSeq(), cp.GetMac(), seq, mac)
	}
	return nil
}
