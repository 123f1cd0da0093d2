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
		ReleaseVolume(volumeID string) (revoke func(context.Context) error)
	}
	log *zap.Logger

	mu   sync.Mutex
	pods map[string]string // volume ID -> pod UID of each volume holding the pod's files
	// mounted holds the pods whose provider-API mounts keep their credentials (last Mount's time):
	// while the node's pod informer (live) says the pod lives, until it is deleted or idle.
	mounted map[string]time.Time
	live    LivePods
	idle    time.Duration
	// inflight counts fetches running per pod UID (CSI publishes and provider mounts): a pod's
	// credentials are not released while one may be using them.
	inflight map[string]int
	releases sync.WaitGroup // background revocations
}

// LivePods says whether a pod lives on this node (csi/podwatch.Watcher): trusted is false while it
// cannot tell (not synced, its watch failing).
type LivePods interface {
	Live(podUID string) (live, trusted bool)
}

// NewPodCredentials returns a tracker releasing through b.
func NewPodCredentials(b Broker, log *zap.Logger) *PodCredentials {
	return &PodCredentials{broker: b, log: log, pods: map[string]string{}, inflight: map[string]int{}, mounted: map[string]time.Time{}}
}

// DefaultProviderIdle is how long a provider-API mount holds its pod's credentials without another
// Mount (the Secrets Store CSI Driver's rotation poll is every 2 minutes by default).
const DefaultProviderIdle = 10 * time.Minute

// WatchPods makes provider-API mounts hold their pod's credentials while live says the pod lives on
// the node (and it was mounted within idle; DefaultProviderIdle if 0): call PodDeleted when one is
// deleted, and Sweep now and then. Without it (or while live cannot tell), every provider mount
// releases its pod's credentials when it ends.
func (s *PodCredentials) WatchPods(live LivePods, idle time.Duration) {
	if idle <= 0 {
		idle = DefaultProviderIdle
	}
	s.mu.Lock()
	s.live, s.idle = live, idle
	s.mu.Unlock()
}

// PodDeleted releases what provider mounts held for a pod deleted from the node.
func (s *PodCredentials) PodDeleted(podUID string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.mounted[podUID]; !ok {
		return
	}
	delete(s.mounted, podUID)
	s.releaseLocked(podUID, nil)
}

// Sweep releases the provider holds of pods not mounted within the idle time, or no longer live
// (a deletion the informer saw while it was not trusted).
func (s *PodCredentials) Sweep(now time.Time) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for uid, at := range s.mounted {
		live, trusted := false, false
		if s.live != nil {
			live, trusted = s.live.Live(uid)
		}
		if now.Sub(at) > s.idle || (trusted && !live) {
			delete(s.mounted, uid)
			s.releaseLocked(uid, nil)
		}
	}
}

// endMount ends a provider-API mount's fetch: the pod's credentials stay held while the pod lives
// on the node as the informer sees it (trusted), and are released otherwise, as before the informer.
func (s *PodCredentials) endMount(podUID string, ok bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.inflight[podUID]--; s.inflight[podUID] <= 0 {
		delete(s.inflight, podUID)
	}
	if ok && s.live != nil {
		// Under s.mu, as PodDeleted: a deletion the informer has processed is out of its store
		// before its handler runs, so either Live says false here or PodDeleted follows.
		if live, trusted := s.live.Live(podUID); live && trusted {
			s.mounted[podUID] = time.Now()
			return
		}
	}
	delete(s.mounted, podUID)
	s.releaseLocked(podUID, nil)
}

// Held is how many pods provider mounts hold credentials for.
func (s *PodCredentials) Held() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.mounted)
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
	s.releaseLocked(podUID, s.releaseVolume(volumeID))
}

// releaseVolume forgets the dynamic credentials of a volume that holds no files (provider mounts,
// with no volume, hold none).
func (s *PodCredentials) releaseVolume(volumeID string) func(context.Context) error {
	if volumeID == "" {
		return nil
	}
	return s.broker.ReleaseVolume(volumeID)
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
	s.releaseLocked(uid, s.releaseVolume(volumeID))
}

// releaseLocked runs revokeVolume (a released volume's leases; nil: none) and releases the pod's
// credentials unless a volume of the pod holds files or a publish of it is running. The leases are
// revoked first, with the token that issued them, then the token. Callers hold s.mu.
func (s *PodCredentials) releaseLocked(podUID string, revokeVolume func(context.Context) error) {
	var revoke func(context.Context) error
	if s.podReleasable(podUID) {
		revoke = s.broker.Release(podUID) // forgets now: no later request can pick the token up
	}
	if revoke == nil && revokeVolume == nil {
		return
	}
	s.releases.Add(1)
	go func() {
		defer s.releases.Done()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if revokeVolume != nil {
			if err := revokeVolume(ctx); err != nil {
				s.log.Warn("revoking a volume's leases failed; they end at their TTL or with their token", zap.String("pod_uid", podUID), zap.Error(err))
			}
		}
		if revoke == nil {
			return
		}
		if err := revoke(ctx); err != nil {
			s.log.Warn("revoking the pod's Vault token failed; it lapses at its TTL", zap.String("pod_uid", podUID), zap.Error(err))
			return
		}
		s.log.Debug("revoked the pod's Vault token", zap.String("pod_uid", podUID))
	}()
}

// podReleasable: no volume of the pod holds files, no publish of it runs, no provider mount holds it.
// Callers hold s.mu.
func (s *PodCredentials) podReleasable(podUID string) bool {
	if podUID == "" || s.inflight[podUID] > 0 {
		return false
	}
	if _, held := s.mounted[podUID]; held {
		return false
	}
	for _, other := range s.pods {
		if other == podUID {
			return false
		}
	}
	return true
}

// volumes is how many volumes are known to hold a pod's files.
func (s *PodCredentials) volumes() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.pods)
}

// Wait waits for background revocations to finish.
func (s *PodCredentials) Wait() { s.releases.Wait() }
