package csi

import (
	"encoding/json"
	"maps"
	"sort"

	"github.com/keyward/keyward/broker"
	"github.com/keyward/keyward/csi/podevents"
	"github.com/keyward/keyward/csi/tmpfs"
)

// VersionDoc is the content of a volume's ..version file (tmpfs.VersionFile), one JSON line:
//
//	{"version":3,"refs":{"payments/db#password":7}}
//
// Version counts the swaps of changed content, from 1 at the first publish; it only grows, across
// driver restarts too (a restarted driver reads it back from the volume). Refs maps each delivered
// "ref#key" to the Vault KV version it was read at. Leases maps each dynamic credential the volume
// holds ("pki:payments_web/api.payments.svc") to the hash of its lease ID, never the ID: after a driver restart the
// broker finds the leases again by it (broker/vault's adopt). It never holds a value.
type VersionDoc struct {
	Version uint64            `json:"version"`
	Refs    map[string]int    `json:"refs"`
	Leases  map[string]string `json:"leases,omitempty"`
}

// versionMode: the file says nothing secret, so every reader of the volume may poll it.
const versionMode = 0o444

// delivered is what the secrets are, for the ..version file (its Version unset): "ref#key" -> the
// Vault version each stored secret was read at, and each dynamic credential's lease hash.
func delivered(secrets []broker.Secret) VersionDoc {
	d := VersionDoc{Refs: make(map[string]int, len(secrets))}
	for _, s := range secrets {
		if s.Ref.Dynamic() {
			if d.Leases == nil {
				d.Leases = map[string]string{}
			}
			d.Leases[broker.LeaseName(s.Ref)] = s.Lease
			continue
		}
		d.Refs[s.Ref.Ref+"#"+s.Ref.Key] = s.Version
	}
	return d
}

// file is the ..version file of d.
func (d VersionDoc) file() tmpfs.File {
	b, _ := json.Marshal(d) // map keys sorted: the same refs and versions, the same bytes
	return tmpfs.File{Name: tmpfs.VersionFile, Mode: versionMode, Data: append(b, '\n')}
}

// ParseVersion reads a ..version file; ok is false for anything else.
func ParseVersion(b []byte) (d VersionDoc, ok bool) {
	if err := json.Unmarshal(b, &d); err != nil || d.Version == 0 {
		return VersionDoc{}, false
	}
	return d, true
}

// changes lists the refs of next whose version differs from prev's (or that prev lacks), by name.
func changes(prev, next map[string]int) []podevents.Change {
	var out []podevents.Change
	for ref, v := range next {
		if p, ok := prev[ref]; !ok || p != v {
			out = append(out, podevents.Change{Ref: ref, From: p, To: v})
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Ref < out[j].Ref })
	return out
}

// nextVersion is the ..version a swap writes, after prev (zero: none known): the count goes up
// unless the same refs at the same versions are swapped in again with content known to be the same
// (sameContent), as the first republish after a driver restart does. A new lease is new content.
func nextVersion(prev VersionDoc, what VersionDoc, sameContent bool) (next VersionDoc, bumped bool) {
	what.Version = prev.Version
	if prev.Version > 0 && sameContent && maps.Equal(prev.Refs, what.Refs) && maps.Equal(prev.Leases, what.Leases) {
		return what, false
	}
	what.Version++
	return what, true
}
