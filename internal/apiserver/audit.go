package apiserver

import (
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/keyward/keyward/internal/audit"
	"github.com/keyward/keyward/internal/fault"
	auditv1 "github.com/keyward/keyward/proto/keyward/audit/v1"
)

// Stream is the audit stream a daemon writes, as the AuditStream service needs it (*audit.Log).
type Stream interface {
	Dir() string
	Node() string
	Stream() string
	KeyID() string
	// Durable is the newest durable record and a channel closed when that moves on.
	Durable() (uint64, <-chan struct{})
	// Done is closed when the stream is closed.
	Done() <-chan struct{}
}

var _ Stream = (*audit.Log)(nil)

// Defaults of AuditOptions.
const (
	DefaultStall          = 30 * time.Second
	DefaultBuffer         = 1024
	DefaultMaxSubscribers = 16
	defaultCPEvery        = 1000
	defaultCPInterval     = time.Minute
)

// AuditOptions configure the AuditStream service.
type AuditOptions struct {
	Stream Stream
	// Stall is how long a subscriber may leave a full buffer of records untaken before it is cut
	// with ResourceExhausted (DefaultStall); Buffer bounds the records read ahead for it
	// (DefaultBuffer); MaxSubscribers bounds the subscriptions at once (DefaultMaxSubscribers).
	Stall          time.Duration
	Buffer         int
	MaxSubscribers int
	// Done, when closed, ends every subscription at once with Unavailable naming where to resume
	// (the daemon is stopping: its graceful stop need not wait out the subscribers).
	Done <-chan struct{}
}

// AuditServer is the AuditStream service over a stream's segment files. Each subscription reads
// the files itself, from its own position; the writer only closes a channel when its durable head
// moves, so no subscriber, however slow, holds up a record.
type AuditServer struct {
	auditv1.UnimplementedAuditStreamServer
	o    AuditOptions
	subs chan struct{}
}

// NewAuditServer checks the options.
func NewAuditServer(o AuditOptions) (*AuditServer, error) {
	if o.Stream == nil {
		return nil, fmt.Errorf("apiserver: a Stream is required")
	}
	if o.Stall <= 0 {
		o.Stall = DefaultStall
	}
	if o.Buffer <= 0 {
		o.Buffer = DefaultBuffer
	}
	if o.MaxSubscribers <= 0 {
		o.MaxSubscribers = DefaultMaxSubscribers
	}
	return &AuditServer{o: o, subs: make(chan struct{}, o.MaxSubscribers)}, nil
}

// Register registers the service.
func (s *AuditServer) Register(g *grpc.Server) { auditv1.RegisterAuditStreamServer(g, s) }

// Subscribe streams records from the requested start, then follows the tail.
func (s *AuditServer) Subscribe(req *auditv1.SubscribeRequest, ss grpc.ServerStreamingServer[auditv1.SubscribeResponse]) error {
	return toStatus(s.subscribe(req, ss))
}

func (s *AuditServer) subscribe(req *auditv1.SubscribeRequest, ss grpc.ServerStreamingServer[auditv1.SubscribeResponse]) error {
	st := s.o.Stream
	if req.GetStream() != "" && req.GetStream() != st.Stream() {
		return fmt.Errorf("this daemon serves node %s's %q audit stream, not %q: %w", st.Node(), st.Stream(), req.GetStream(), fault.ErrNotFound)
	}
	from := req.GetFromSeq()
	cp := req.GetFromCheckpoint()
	if cp != nil {
		if (cp.GetNode() != "" && cp.GetNode() != st.Node()) || (cp.GetStream() != "" && cp.GetStream() != st.Stream()) {
			return fmt.Errorf("the checkpoint is node %s's %q stream, not this one (node %s, %q): %w", cp.GetNode(), cp.GetStream(), st.Node(), st.Stream(), errMismatch)
		}
		from = cp.GetSeq() // read first, to check its mac; the first record sent is the next
	}
	select {
	case s.subs <- struct{}{}:
		defer func() { <-s.subs }()
	default:
		// Nothing was sent: resume where this subscription would have begun.
		resume := from
		if cp != nil {
			resume = cp.GetSeq() + 1
		}
		return &errBehind{resume: resume, why: fmt.Sprintf("%d subscribers already", cap(s.subs))}
	}
	head, _ := st.Durable()
	if from > head+1 {
		return &errAhead{want: from, head: head}
	}
	cur, err := audit.OpenCursor(st.Dir(), from)
	if err != nil {
		return err
	}
	defer cur.Close()
	if cp != nil {
		rec, ok, err := cur.Next(head)
		switch {
		case err != nil:
			return err
		case !ok:
			return fmt.Errorf("checkpoint record %d is not durable on disk: %w", cp.GetSeq(), errMismatch)
		case rec.MAC != cp.GetMac():
			return fmt.Errorf("record %d on disk has mac %s, the checkpoint %s: the stream on disk is not the one checkpointed: %w", rec.Seq, rec.MAC, cp.GetMac(), errMismatch)
		}
	}

	// A sender goroutine takes records from a bounded queue; this one reads the files into it. When
	// the queue stays full for the stall timeout the subscriber is cut, told where to resume.
	queue := make(chan *auditv1.SubscribeResponse, s.o.Buffer)
	sendErr := make(chan error, 1)
	var sent atomic.Uint64 // seq of the last record handed to the transport
	sent.Store(cur.Pos() - 1)
	quit := make(chan struct{})
	go func() {
		for {
			var m *auditv1.SubscribeResponse
			select {
			case <-quit: // the handler returned: nothing more is sent (what is queued is dropped)
				return
			case m = <-queue:
			}
			select {
			case <-quit:
				return
			default:
			}
			if err := ss.Send(m); err != nil {
				sendErr <- err
				return
			}
			if r := m.GetRecord(); r != nil {
				sent.Store(r.GetSeq())
			}
		}
	}()
	// A Send blocked on a subscriber that reads nothing returns once the stream ends, which is when
	// this handler returns: it cannot be waited for here.
	defer close(quit)

	every, interval := uint64(req.GetCheckpointEvery()), time.Duration(req.GetCheckpointSeconds())*time.Second
	if every == 0 {
		every = defaultCPEvery
	}
	if interval <= 0 {
		interval = defaultCPInterval
	}
	f := req.GetFilter()
	var last audit.Line
	lastWhole := false // the last record was sent whole: a checkpoint may name it
	sinceCP, cpAt := uint64(0), time.Now()
	ticker := time.NewTicker(min(interval, time.Second))
	defer ticker.Stop()
	stall := time.NewTimer(s.o.Stall)
	stall.Stop()
	push := func(m *auditv1.SubscribeResponse) error {
		select {
		case queue <- m:
			return nil
		default:
		}
		stall.Reset(s.o.Stall)
		defer stall.Stop()
		select {
		case queue <- m:
			return nil
		case err := <-sendErr:
			return err
		case <-ss.Context().Done():
			return ss.Context().Err()
		case <-stall.C:
			return &errBehind{resume: sent.Load() + 1, why: fmt.Sprintf("the subscriber took no record for %s while %d waited for it", s.o.Stall, s.o.Buffer)}
		}
	}
	// A checkpoint only ever names a record sent whole, so that with a filter every checkpoint
	// re-anchors the subscriber's chain on a record it verified itself (a server without the key
	// could otherwise send elided records, and checkpoints naming them, for ever).
	checkpoint := func(head uint64) error {
		if last.Seq == 0 || !lastWhole {
			return nil
		}
		sinceCP, cpAt = 0, time.Now()
		return push(&auditv1.SubscribeResponse{Item: &auditv1.SubscribeResponse_Checkpoint{Checkpoint: &auditv1.Checkpoint{
			Node: st.Node(), Stream: st.Stream(), KeyId: st.KeyID(), Seq: last.Seq, Mac: last.MAC,
			Time: timestamppb.New(cpAt.UTC()), HeadSeq: head}}})
	}
	for {
		head, moved := st.Durable()
		for {
			rec, ok, err := cur.Next(head)
			if err != nil {
				return err
			}
			if !ok {
				break
			}
			// A checkpoint is due after this record: it is sent whole whatever the filter says.
			cpDue := sinceCP+1 >= every || time.Since(cpAt) >= interval
			r := &auditv1.Record{Seq: rec.Seq, Mac: rec.MAC, Segment: rec.Segment}
			if cpDue || Selects(f, rec.Raw) {
				r.Line = rec.Raw
			}
			if err := push(&auditv1.SubscribeResponse{Item: &auditv1.SubscribeResponse_Record{Record: r}}); err != nil {
				return err
			}
			last, lastWhole = rec, len(r.Line) > 0
			if sinceCP++; cpDue {
				if err := checkpoint(head); err != nil {
					return err
				}
			}
		}
		select {
		case <-moved:
		case <-ticker.C:
			// After an elided record the time's checkpoint waits for the next record (sent whole).
			if sinceCP > 0 && lastWhole && time.Since(cpAt) >= interval {
				if err := checkpoint(head); err != nil {
					return err
				}
			}
		case err := <-sendErr:
			return err
		case <-ss.Context().Done():
			return ss.Context().Err()
		case <-st.Done():
			return fmt.Errorf("the audit stream closed (the daemon is stopping); resume with from_seq %d: %w", sent.Load()+1, fault.ErrUnavailable)
		case <-s.o.Done:
			return fmt.Errorf("the daemon is stopping; resume with from_seq %d: %w", sent.Load()+1, fault.ErrUnavailable)
		}
	}
}

// Selects reports whether f selects the record (its line as written): the records a filtered
// subscription sends whole (besides those a checkpoint names). The stream's own records always pass.
func Selects(f *auditv1.Filter, raw []byte) bool {
	if f == nil || (len(f.GetEvents()) == 0 && len(f.GetDecisions()) == 0 && f.GetNamespace() == "") {
		return true
	}
	var r audit.Record
	if err := json.Unmarshal(raw, &r); err != nil {
		return true // not readable as a record: sent whole, the subscriber's check says what it is
	}
	if strings.HasPrefix(string(r.Type), "audit_") {
		return true
	}
	return (len(f.GetEvents()) == 0 || slices.Contains(f.GetEvents(), string(r.Type))) &&
		(len(f.GetDecisions()) == 0 || slices.Contains(f.GetDecisions(), string(r.Decision))) &&
		(f.GetNamespace() == "" || f.GetNamespace() == r.Subject.Namespace)
}
