package csi

import (
	"maps"
	"time"

	"github.com/keyward/keyward/broker"
)

// LiveVolume is a volume holding a pod's files, as the admin API shows it: whose, which refs at
// which Vault versions, since when. It never holds a value.
type LiveVolume struct {
	VolumeID    string
	Pod         broker.Identity // as the publish request claimed it, checked against the token
	Environment string
	// Refs maps each delivered "ref#key" to the Vault version it was read at; Version is the
	// volume's ..version count.
	Refs    map[string]int
	Version uint64
	// Since is this process's first delivery to the volume, Last its latest (publish or republish).
	Since, Last time.Time
}

// livePod is who a volume's files are for, and when this process delivered them.
type livePod struct {
	id          broker.Identity
	since, last time.Time
}

// delivered notes a successful publish or republish of volumeID for the pod.
func (s *Server) deliveredTo(volumeID string, id broker.Identity) {
	now := time.Now().UTC()
	s.deliveredMu.Lock()
	defer s.deliveredMu.Unlock()
	if s.live == nil {
		s.live = map[string]livePod{}
	}
	p, ok := s.live[volumeID]
	if !ok || p.id.PodUID != id.PodUID {
		p = livePod{id: id, since: now}
	}
	p.last = now
	s.live[volumeID] = p
}

// LiveVolumes lists the volumes holding a pod's files that this process delivered (a volume
// published before a restart shows from its first republish on).
func (s *Server) LiveVolumes() []LiveVolume {
	s.deliveredMu.Lock()
	defer s.deliveredMu.Unlock()
	var out []LiveVolume
	for id, d := range s.delivered {
		p, ok := s.live[id]
		if !ok {
			continue
		}
		out = append(out, LiveVolume{VolumeID: id, Pod: p.id, Environment: d.environment, Refs: maps.Clone(d.version.Refs),
			Version: d.version.Version, Since: p.since, Last: p.last})
	}
	return out
}
