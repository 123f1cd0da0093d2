package csi

import (
	"encoding/json"
	"fmt"
	"strings"
	"testing"
)

// LiveVolumes lists the published volumes with their pod, refs and Vault versions, and no value;
// a republish keeps since and moves last; an unpublished or withdrawn volume is gone.
func TestLiveVolumes(t *testing.T) {
	n := newSeamNode(t)
	n.b.set("CANARY-secret-value", nil)
	target := n.target(podA, "secrets")
	req := n.publishReq(podA, target, twoSecrets)
	if err := n.publish(req); err != nil {
		t.Fatal(err)
	}
	vols := n.s.LiveVolumes()
	if len(vols) != 1 {
		t.Fatalf("%d live volumes after a publish", len(vols))
	}
	v := vols[0]
	if v.VolumeID != req.GetVolumeId() || v.Pod.PodUID != podA || v.Pod.Namespace == "" || v.Version != 1 ||
		len(v.Refs) != 2 || v.Refs["payments/db#password"] == 0 || v.Since.IsZero() {
		t.Fatalf("live volume: %+v", v)
	}
	js, _ := json.Marshal(vols)
	if s := fmt.Sprintf("%s %+v", js, vols); strings.Contains(s, "CANARY") {
		t.Fatalf("a live volume carries a secret value: %s", s)
	}
	if err := n.publish(req); err != nil { // republish
		t.Fatal(err)
	}
	if w := n.s.LiveVolumes()[0]; !w.Since.Equal(v.Since) || w.Last.Before(v.Last) {
		t.Fatalf("after a republish: %+v, before %+v", w, v)
	}
	if err := n.unpublish(req.GetVolumeId(), target); err != nil {
		t.Fatal(err)
	}
	if vols := n.s.LiveVolumes(); len(vols) != 0 {
		t.Fatalf("after unpublish: %+v", vols)
	}
	n.b.set("CANARY", nil)
	if err := n.publish(req); err != nil {
		t.Fatal(err)
	}
	n.b.set("CANARY", withdrawnErr())
	n.publish(req) // withdrawn: the files are cleared
	if vols := n.s.LiveVolumes(); len(vols) != 0 {
		t.Fatalf("after a withdrawal: %+v", vols)
	}
}
