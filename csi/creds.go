package csi

import (
	"context"
	"regexp"
	"sync"
	"time"

	"go.uber.org/zap"
)

// PodCredentials decides when the credentials the broker holds for a pod (its Vault token) go. One
// instance is shared by the node and provider servers of a process.
type PodCredentials struct {
	broker interface {
		Release(podUID string) (revoke func(context.Context) error)
	}
	log *zap.Logger

	mu   sync.Mutex
	pods map[string]string // volume ID -> pod UID of each volume holding the pod's files
	// inflight counts fetches running per pod UID (CSI publishes and provider mounts): a pod's
	// credentials are not released while one may be using them.
	inflight map[string]int
	releases sync.WaitGroup // background revocations
}

// NewPodCredentials returns a tracker releasing through b.
func NewPodCredentials(b Broker, log *zap.Logger) *PodCredentials {
	return &PodCredentials{broker: b, log: log, pods: map[string]string{}, inflight: map[string]int{}}
}

// Pod credentials follow the pod's volumes. A Vault token the broker obtained for a pod is released
// (forgotten at once, revoked at Vault in the background) when no volume of the pod holds its files
// and no fetch for the pod is running: after its last volume is unpublished, after a republish was
// refused and cleared the files, after a failed first publish, and after a provider-API mount of a
// pod with no CSI volume (the Secrets Store CSI Driver writes those files itself and never tells us
// when they go). Deciding and forgetting happen under s.mu, and fetches register under s.mu first,
// so a release never takes a token a running fetch for the pod may still use; a later one logs in
// afresh.

// begin registers a fetch for the pod.
func (s *PodCredentials) begin(podUID string) {
	s.mu.Lock()
	s.inflight[podUID]++
	s.mu.Unlock()
}

// end unregisters a fetch; holdsFiles says whether volumeID holds the pod's files now (provider
// mounts pass "" and false).
func (s *PodCredentials) end(volumeID, podUID string, holdsFiles bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.inflight[podUID]--; s.inflight[podUID] <= 0 {
		delete(s.inflight, podUID)
	}
	if holdsFiles {
		s.pods[volumeID] = podUID // also re-learns volumes published before a driver restart
		return
	}
	delete(s.pods, volumeID)
	s.releaseLocked(podUID)
}

// podUIDInPath finds the pod UID in a kubelet target path (.../pods/<uid>/volumes/...), for volumes
// published before a driver restart.
var podUIDInPath = regexp.MustCompile(`/pods/([0-9a-fA-F-]{36})/volumes/`)

// unpublished forgets an unpublished volume and releases its pod's credentials if it was the last.
func (s *PodCredentials) unpublished(volumeID, target string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	uid, ok := s.pods[volumeID]
	delete(s.pods, volumeID)
	if !ok {
		if m := podUIDInPath.FindStringSubmatch(target); m != nil {
			uid = m[1]
		}
	}
	s.releaseLocked(uid)
}

// releaseLocked releases the pod's credentials unless a volume of the pod holds files or a publish of
// it is running. Callers hold s.mu.
func (s *PodCredentials) releaseLocked(podUID string) {
	if podUID == "" || s.inflight[podUID] > 0 {
		return
	}
	for _, other := range s.pods {
		if other == podUID {
			return
		}
	}
	revoke := s.broker.Release(podUID) // forgets now: no later request can pick the token up
	if revoke == nil {
		return
	}
	s.releases.Add(1)
	go func() {
		defer s.releases.Done()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := revoke(ctx); err != nil {
			s.log.Warn("revoking the pod's Vault token failed; it lapses at its TTL", zap.String("pod_uid", podUID), zap.Error(err))
			return
		}
		s.log.Debug("revoked the pod's Vault token", zap.String("pod_uid", podUID))
	}()
}

// volumes is how many volumes are known to hold a pod's files.
func (s *PodCredentials) volumes() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.pods)
}

// Wait waits for background revocations to finish.
func (s *PodCredentials) Wait() { s.releases.Wait() }
