package csi

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"os"
	"strconv"

	"go.uber.org/zap"

	"github.com/keyward/keyward/csi/podevents"
	"github.com/keyward/keyward/csi/tmpfs"
)

// Mounter is what the node server needs of the node's mounts: tmpfs volumes in production
// (nodeMounter); tests substitute faults to reach the cleanup paths without root.
type Mounter interface {
	// Mount mounts a size-bounded tmpfs at target (an existing directory).
	Mount(target string, o tmpfs.MountOptions) error
	// Unmount scrubs and unmounts the volume at target (idempotent); scrubErr reports files it could
	// not overwrite first, err a volume it could not unmount.
	Unmount(target string, limit int64) (scrubErr, err error)
	// Published reports whether a volume is mounted at target.
	Published(target string) (bool, error)
	// Open opens the volume mounted at target.
	Open(target string, limit int64) (Mounted, error)
}

// Mounted is a mounted volume's files (tmpfs.Volume).
type Mounted interface {
	Swap(files []tmpfs.File, gid int, dirMode os.FileMode) error
	Clear() error
	Current() (payload string, ok bool)
	Intact(files []tmpfs.File, gid int) bool
	ReadVersion() ([]byte, error)
	Close() error
}

var _ Mounted = (*tmpfs.Volume)(nil)

// nodeMounter is Mounter over csi/tmpfs.
type nodeMounter struct{}

func (nodeMounter) Mount(target string, o tmpfs.MountOptions) error {
	_, err := tmpfs.Mount(target, o)
	return err
}

func (nodeMounter) Unmount(target string, limit int64) (error, error) {
	return tmpfs.Unmount(target, limit)
}

func (nodeMounter) Published(target string) (bool, error) { return tmpfs.Published(target) }

func (nodeMounter) Open(target string, limit int64) (Mounted, error) {
	v, err := tmpfs.Open(target, limit)
	if err != nil {
		return nil, err
	}
	return v, nil
}

// digest is a keyed hash of a payload's files (names, modes, group, contents): equal digests, equal
// sets. A file of a randomized conversion (pkcs12) counts by its inputs (payload.ident), so the same
// inputs encoded again are no change. The key is random per process, so the digest says nothing
// about the values.
func (s *Server) digest(p payload, gid int) [32]byte {
	h := hmac.New(sha256.New, s.digestKey[:])
	var n [8]byte
	put := func(b []byte) {
		binary.BigEndian.PutUint64(n[:], uint64(len(b)))
		h.Write(n[:])
		h.Write(b)
	}
	put([]byte(strconv.Itoa(gid)))
	for i, f := range p.files {
		put([]byte(f.Name))
		put([]byte(strconv.FormatUint(uint64(f.Mode), 8)))
		if i < len(p.ident) && p.ident[i] != nil {
			put([]byte("inputs"))
			put(p.ident[i])
			continue
		}
		put([]byte("data"))
		put(f.Data)
	}
	var out [32]byte
	copy(out[:], h.Sum(nil))
	return out
}

// swapped records what a volume delivers after a swap, read from environment env, and its
// ..version.
func (s *Server) swapped(volumeID string, v Mounted, sum [32]byte, env string, ver VersionDoc, vf tmpfs.File) {
	payload, _ := v.Current()
	s.deliveredMu.Lock()
	s.delivered[volumeID] = delivery{payload: payload, digest: sum, environment: env, version: ver, versionFile: vf}
	s.counted[volumeID] = ver.Version
	s.deliveredMu.Unlock()
}

// deliveredEnvironment is the environment the volume's files were read from ("": unknown, as after
// a restart).
func (s *Server) deliveredEnvironment(volumeID string) string {
	s.deliveredMu.Lock()
	defer s.deliveredMu.Unlock()
	return s.delivered[volumeID].environment
}

// deliveredLeases reads, after a driver restart, the lease hashes a published volume's ..version
// names (nil if there are none or it cannot be read: the leases are then issued afresh and the old
// ones lapse).
func (s *Server) deliveredLeases(volumeID, target string, limit int64) map[string]string {
	v, err := s.o.Mounter.Open(target, limit)
	if err != nil {
		s.o.Log.Warn("republish: the volume could not be opened to find its leases", zap.String("volume_id", volumeID), zap.Error(err))
		return nil
	}
	defer v.Close()
	b, err := v.ReadVersion()
	if err != nil {
		s.o.Log.Warn("republish: the volume's ..version could not be read to find its leases", zap.String("volume_id", volumeID), zap.Error(err))
		return nil
	}
	d, _ := ParseVersion(b)
	return d.Leases
}

// forget forgets what a volume delivers (its files were cleared, or a swap failed), but not its
// ..version count: a later swap into the same volume counts on.
func (s *Server) forget(volumeID string) {
	s.deliveredMu.Lock()
	delete(s.delivered, volumeID)
	s.deliveredMu.Unlock()
}

// unpublished forgets a volume entirely.
func (s *Server) unpublished(volumeID string) {
	s.deliveredMu.Lock()
	delete(s.delivered, volumeID)
	delete(s.counted, volumeID)
	delete(s.live, volumeID)
	s.deliveredMu.Unlock()
}

// rotation is what a republish's swap changed: the new ..version and the refs whose Vault version
// moved.
type rotation struct {
	version uint64
	changes []podevents.Change
}

// update swaps new files into a published volume, unless it already delivers exactly them: the
// payload in force is the one this process swapped in, with the same digest, and its layout is
// intact (metadata only: nothing in the volume is opened). A swap writes the ..version after the
// one in force (remembered, also across a withdrawal that cleared the files, or read back from the
// volume after a restart); it returns the rotation when the count went up from a known one.
func (s *Server) update(volumeID, target string, limit int64, p payload, gid int, env string, what VersionDoc) (*rotation, error) {
	files := p.files
	v, err := s.o.Mounter.Open(target, limit)
	if err != nil {
		return nil, err
	}
	defer v.Close()
	sum := s.digest(p, gid)
	s.deliveredMu.Lock()
	d, known := s.delivered[volumeID]
	s.deliveredMu.Unlock()
	if cur, ok := v.Current(); known && ok && cur == d.payload && d.digest == sum && d.environment == env &&
		v.Intact(append(files[:len(files):len(files)], d.versionFile), gid) {
		return nil, nil
	}
	prev := d.version
	s.deliveredMu.Lock()
	counted := s.counted[volumeID]
	s.deliveredMu.Unlock()
	switch {
	case !known && counted > 0: // cleared by a withdrawal (or a failed swap) since: count on
		prev = VersionDoc{Version: counted}
	case !known: // a restart: the count goes on from the volume's own ..version
		if b, err := v.ReadVersion(); err != nil {
			s.o.Log.Warn("republish: the volume's ..version could not be read; counting from it is lost", zap.String("volume_id", volumeID), zap.Error(err))
		} else if b != nil {
			prev, _ = ParseVersion(b)
		}
	}
	next, bumped := nextVersion(prev, what, !known || d.digest == sum)
	vf := next.file()
	if err := v.Swap(append(files[:len(files):len(files)], vf), gid, dirMode(gid)); errors.Is(err, tmpfs.ErrScrub) {
		s.o.Log.Warn("republish: the new files are in force; an old file could not be overwritten first", zap.String("volume_id", volumeID), zap.Error(err))
	} else if err != nil {
		s.forget(volumeID)
		return nil, err
	}
	s.swapped(volumeID, v, sum, env, next, vf)
	if !bumped || prev.Version == 0 {
		return nil, nil
	}
	return &rotation{version: next.Version, changes: changes(prev.Refs, what.Refs)}, nil
}

// clear removes a published volume's files.
func (s *Server) clear(volumeID, target string, limit int64) error {
	s.forget(volumeID)
	v, err := s.o.Mounter.Open(target, limit)
	if err != nil {
		return err
	}
	defer v.Close()
	if err := v.Clear(); errors.Is(err, tmpfs.ErrScrub) {
		s.o.Log.Warn("clearing: the files are gone; an old file could not be overwritten first", zap.String("volume_id", volumeID), zap.Error(err))
	} else if err != nil {
		return err
	}
	return nil
}
