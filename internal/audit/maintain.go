package audit

import (
	"context"
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"time"
)

// Bounds of the fsync retry backoff.
const (
	minRetry = 50 * time.Millisecond
	maxRetry = 5 * time.Second
)

// maintain is the log's one background loop: it fsyncs what was written (retrying with backoff
// while that fails), records recoveries, emits checkpoints and deletes segments beyond the limit.
func (l *Log) maintain() {
	defer close(l.stopped)
	every := l.o.SyncInterval
	if every <= 0 {
		every = time.Second
	}
	var backoff time.Duration
	t := time.NewTimer(every)
	defer t.Stop()
	for {
		select {
		case <-l.stop:
			return
		case <-t.C:
		case <-l.kick:
			if !t.Stop() {
				select {
				case <-t.C:
				default:
				}
			}
		}
		if err := l.syncPending(); err != nil {
			backoff = min(max(2*backoff, minRetry), maxRetry)
			t.Reset(backoff)
			continue
		}
		backoff = 0
		l.noteRecovery()
		l.checkpoint(time.Now())
		l.prune()
		t.Reset(every)
	}
}

// syncPending fsyncs what was written since the last good fsync. After a failed fsync the kernel
// may have dropped those pages while reporting them clean, so a retry writes them again first.
func (l *Log) syncPending() error {
	l.mu.Lock()
	if l.o.SyncInterval <= 0 || (len(l.pend) == 0 && l.syncErr == nil) {
		l.mu.Unlock()
		return nil
	}
	for l.syncing { // rotation syncs too; writes may go on meanwhile
		l.cond.Wait()
	}
	out, n, off, retry := l.out, len(l.pend), l.pendOff, l.syncErr != nil
	var again []byte
	if retry {
		again = slices.Clone(l.pend)
	}
	seq, mac := l.writtenSeq, l.writtenMAC
	l.syncing = true
	l.mu.Unlock()

	var err error
	if retry && len(again) > 0 {
		_, err = out.WriteAt(again, off)
	}
	if err == nil {
		err = out.Sync()
	}

	l.mu.Lock()
	defer l.mu.Unlock()
	l.syncing = false
	l.cond.Broadcast()
	if err != nil {
		l.failedLocked(&l.syncErr, err)
		return err
	}
	l.syncedLocked(n, seq, mac)
	return nil
}

// noteRecovery states in the stream that it could not be written for a while and is again. While
// writes fail, that record is also the probe that finds out when the disk works again, so a node
// with no requests recovers too.
func (l *Log) noteRecovery() {
	l.mu.Lock()
	note := l.outage
	if note == "" && l.writeErr != nil {
		note = fmt.Sprintf("audit records could not be written from %s (%v); %d records were refused (their requests failed); written again now",
			l.failingSince.Format(time.RFC3339Nano), l.writeErr, l.refused)
	}
	l.mu.Unlock()
	if note == "" {
		return
	}
	ev := Event{Type: EventAuditRecovered, Reason: note, Chain: l.chain()}
	ev.Outcome(nil)
	err := l.Record(context.Background(), ev)
	l.mu.Lock()
	if err == nil {
		l.outage = ""
	} else {
		l.refused-- // the probe is not a request
	}
	l.mu.Unlock()
}

// checkpoint writes the durable chain head to the checkpoint sink when due (signed, if a signer is
// set, without waiting for the signature: see writeCheckpoint).
func (l *Log) checkpoint(now time.Time) {
	if l.o.Checkpoints == nil {
		return
	}
	l.mu.Lock()
	seq, mac := l.durableSeq, l.durableMAC
	due := seq > l.cpSeq && (seq-l.cpSeq >= l.o.CheckpointEvery || now.Sub(l.cpTime) >= l.o.CheckpointInterval)
	if due {
		l.cpSeq, l.cpTime = seq, now
	}
	l.mu.Unlock()
	if !due {
		return
	}
	l.writeCheckpoint(Checkpoint{Node: l.o.Node, Stream: l.o.Stream, KeyID: l.keyID, Seq: seq,
		MAC: hex.EncodeToString(mac), Time: now.UTC()})
}

// prune deletes the oldest segment while there are more than MaxSegments, after a durable
// audit_pruned record names its last record (so a verifier knows the gap is a deletion, not an
// attack).
func (l *Log) prune() {
	for {
		l.mu.Lock()
		if len(l.segs) <= l.o.MaxSegments {
			l.mu.Unlock()
			return
		}
		old, next := l.segs[0], l.segs[1]
		l.mu.Unlock()
		c := l.chain()
		c.FirstSeq, c.PrevSeq, c.PrevMAC, c.Segment = old.first, next.prevSeq, next.prevMAC, old.name
		ev := Event{Type: EventAuditPruned, Reason: "segment deleted: more than the segments kept", Chain: c}
		ev.Outcome(nil)
		if l.Record(context.Background(), ev) != nil || l.syncPending() != nil {
			return
		}
		err := os.Remove(filepath.Join(l.o.Dir, old.name))
		if err == nil || os.IsNotExist(err) {
			syncDir(l.o.Dir)
		}
		l.mu.Lock()
		if len(l.segs) > 0 && l.segs[0].name == old.name {
			l.segs = l.segs[1:]
		}
		l.mu.Unlock()
		if err != nil && !os.IsNotExist(err) {
			return // kept out of the list; the record says it was meant to go
		}
	}
}
