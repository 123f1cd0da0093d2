package audit

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"time"
)

// Flags are the audit command-line flags both daemons take.
type Flags struct {
	Dir, KeyFile       string
	Stdout             bool
	Checkpoints        bool
	MaxSize            Bytes
	MaxAge             time.Duration
	MaxSegments        int
	CheckpointEvery    uint64
	CheckpointInterval time.Duration
}

// Bind registers the flags; dir is the stream directory's default.
func (f *Flags) Bind(fs *flag.FlagSet, dir string) {
	f.MaxSize = DefaultMaxSegmentBytes
	fs.StringVar(&f.Dir, "audit-dir", dir, "audit stream directory: hash-chained JSON-lines segments")
	fs.StringVar(&f.KeyFile, "audit-key-file", "/etc/keyward/audit.key", "file holding this node's audit HMAC key (see keywardctl audit node-key)")
	fs.BoolVar(&f.Stdout, "audit-stdout", false, "also copy audit records to stdout (best effort)")
	fs.BoolVar(&f.Checkpoints, "audit-checkpoints", true, "write chain checkpoints to stdout, for the log shipper to keep off the node")
	fs.Var(&f.MaxSize, "audit-max-size", "begin a new segment at this size (bytes, or with a Ki, Mi or Gi suffix)")
	fs.DurationVar(&f.MaxAge, "audit-max-age", DefaultMaxSegmentAge, "begin a new segment at this age")
	fs.IntVar(&f.MaxSegments, "audit-max-segments", DefaultMaxSegments, "segments kept; older ones are deleted, after a record saying so")
	fs.Uint64Var(&f.CheckpointEvery, "audit-checkpoint-every", DefaultCheckpointEvery, "write a checkpoint after this many records")
	fs.DurationVar(&f.CheckpointInterval, "audit-checkpoint-interval", DefaultCheckpointInterval, "write a checkpoint at least this often (when there are new records)")
}

// Validate reports the first problem with the flags.
func (f Flags) Validate() error {
	switch {
	case f.Dir == "" || f.KeyFile == "":
		return errors.New("--audit-dir and --audit-key-file are required: every access is audited")
	case f.MaxSize < 64<<10:
		return errors.New("--audit-max-size must be at least 64Ki")
	case f.MaxAge < time.Minute:
		return errors.New("--audit-max-age must be at least 1m")
	case f.MaxSegments < 1:
		return errors.New("--audit-max-segments must be at least 1")
	case f.CheckpointEvery < 1 || f.CheckpointInterval < time.Second:
		return errors.New("--audit-checkpoint-every must be positive and --audit-checkpoint-interval at least 1s")
	}
	return nil
}

// Options are the Log options of node's stream.
func (f Flags) Options(node, stream string) Options {
	o := Options{Dir: f.Dir, KeyFile: f.KeyFile, Node: node, Stream: stream, SyncInterval: time.Second,
		MaxSegmentBytes: int64(f.MaxSize), MaxSegmentAge: f.MaxAge, MaxSegments: f.MaxSegments,
		CheckpointEvery: f.CheckpointEvery, CheckpointInterval: f.CheckpointInterval}
	if f.Stdout {
		o.Copy = os.Stdout
	}
	if f.Checkpoints {
		o.Checkpoints = io.Writer(os.Stdout)
	}
	return o
}

// Bytes is a size flag: a number of bytes, or one with a Ki, Mi or Gi suffix.
type Bytes int64

func (b *Bytes) String() string { return strconv.FormatInt(int64(*b), 10) }

// Set parses a size.
func (b *Bytes) Set(s string) error {
	mult := int64(1)
	for suffix, m := range map[string]int64{"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30} {
		if strings.HasSuffix(s, suffix) {
			s, mult = strings.TrimSuffix(s, suffix), m
			break
		}
	}
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil || n < 0 || n > (1<<62)/mult {
		return fmt.Errorf("not a size: %q", s)
	}
	*b = Bytes(n * mult)
	return nil
}
