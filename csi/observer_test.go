package csi

import (
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
)

type publishLog struct {
	mu  sync.Mutex
	got []string
}

func (l *publishLog) Published(p Publish) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if p.Duration <= 0 {
		l.got = append(l.got, "no duration")
	}
	l.got = append(l.got, fmt.Sprintf("%s/%s", p.Result, p.Code))
}

// Every publish is observed once, with what it did and the code kubelet got; the volumes holding
// files are counted as they come and go.
func TestPublishesAreObserved(t *testing.T) {
	n := newSeamNode(t)
	obs := &publishLog{}
	n.s.o.Observer = obs
	target := n.target(podA, "secrets")
	req := n.publishReq(podA, target, twoSecrets)
	n.publish(req) // first publish
	if n.s.Volumes() != 1 {
		t.Fatalf("%d volumes after a publish", n.s.Volumes())
	}
	n.publish(req) // unchanged republish
	n.b.set("CANARY", errors.New("vault down"))
	n.publish(req) // failed republish: files kept
	n.b.set("CANARY", withdrawnErr())
	n.publish(req) // withdrawn: cleared
	if n.s.Volumes() != 0 {
		t.Fatalf("%d volumes after a withdrawal", n.s.Volumes())
	}
	bad := n.publishReq(podA, target, twoSecrets)
	bad.Readonly = false
	n.publish(bad) // refused before anything is fetched
	want := "published/OK,republished/OK,failed/Internal,withdrawn/PermissionDenied,refused/InvalidArgument"
	if got := strings.Join(obs.got, ","); got != want {
		t.Fatalf("observed %s, want %s", got, want)
	}
}
