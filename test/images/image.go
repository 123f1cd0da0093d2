package images

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strings"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// entry is one file of an image's only layer.
type entry struct {
	path string // absolute, in the image
	src  string // a regular file: the host file whose content it has
	link string // a symlink: its target
	mode int64  // a regular file's permission bits
}

// The OCI annotation keys and label keys the images carry.
const (
	LabelSource      = "org.opencontainers.image.source"
	LabelRevision    = "org.opencontainers.image.revision"
	LabelVersion     = "org.opencontainers.image.version"
	LabelCreated     = "org.opencontainers.image.created"
	LabelTitle       = "org.opencontainers.image.title"
	LabelDescription = "org.opencontainers.image.description"
	// annotationRefName and annotationImageName name the image in index.json: containerd's import
	// takes its name from the second.
	annotationRefName   = "org.opencontainers.image.ref.name"
	annotationImageName = "io.containerd.image.name"
)

// assemble builds the image: one layer of entries and a config that runs the first binary.
func assemble(s spec, entries []entry, m Meta) (v1.Image, error) {
	created := m.Created.UTC().Truncate(time.Second)
	layer, err := layerOf(entries, created)
	if err != nil {
		return nil, err
	}
	cfg := &v1.ConfigFile{
		Architecture: Platform().Architecture,
		OS:           Platform().OS,
		Created:      v1.Time{Time: created},
		Config: v1.Config{
			Entrypoint: []string{BinDir + "/" + s.bins[0].base()},
			User:       s.user,
			Env:        []string{"PATH=" + BinDir},
			WorkingDir: "/",
			Labels: map[string]string{
				LabelSource:      m.Source,
				LabelRevision:    m.Revision,
				LabelVersion:     m.Version,
				LabelCreated:     created.Format(time.RFC3339),
				LabelTitle:       s.name,
				LabelDescription: s.description,
			},
		},
		RootFS: v1.RootFS{Type: "layers"},
	}
	base := mutate.MediaType(empty.Image, types.OCIManifestSchema1)
	base = mutate.ConfigMediaType(base, types.OCIConfigJSON)
	base, err = mutate.ConfigFile(base, cfg)
	if err != nil {
		return nil, err
	}
	var bins []string
	for _, b := range s.bins {
		bins = append(bins, b.base())
	}
	return mutate.Append(base, mutate.Addendum{
		Layer: layer,
		History: v1.History{
			Created:   v1.Time{Time: created},
			CreatedBy: "test/tools/mkimage " + s.name,
			Comment:   "keyward " + m.Version + ": " + strings.Join(bins, ", "),
		},
		MediaType: types.OCILayer,
	})
}

// layerOf is the gzip-compressed tar of entries and their parent directories, sorted by path, owned
// by 0:0, every time set to created: nothing of the build machine's file metadata gets in.
func layerOf(entries []entry, created time.Time) (v1.Layer, error) {
	all := map[string]entry{}
	for _, e := range entries {
		if prev, ok := all[e.path]; ok && prev != e {
			return nil, fmt.Errorf("%s is in the image twice, differently", e.path)
		}
		all[e.path] = e
		for d := path.Dir(e.path); d != "/"; d = path.Dir(d) {
			if prev, ok := all[d]; ok && (prev.src != "" || prev.link != "") {
				return nil, fmt.Errorf("%s is a file and a directory", d)
			}
			all[d] = entry{path: d, mode: 0o755}
		}
	}
	paths := make([]string, 0, len(all))
	for p := range all {
		paths = append(paths, p)
	}
	sort.Strings(paths)

	var raw bytes.Buffer
	tw := tar.NewWriter(&raw)
	for _, p := range paths {
		e := all[p]
		h := &tar.Header{Name: strings.TrimPrefix(p, "/"), ModTime: created, Uid: 0, Gid: 0}
		switch {
		case e.link != "":
			h.Typeflag, h.Linkname, h.Mode = tar.TypeSymlink, e.link, 0o777
		case e.src != "":
			b, err := os.ReadFile(e.src)
			if err != nil {
				return nil, err
			}
			h.Typeflag, h.Mode, h.Size = tar.TypeReg, e.mode, int64(len(b))
			if err := tw.WriteHeader(h); err != nil {
				return nil, err
			}
			if _, err := tw.Write(b); err != nil {
				return nil, err
			}
			continue
		default:
			h.Typeflag, h.Name, h.Mode = tar.TypeDir, h.Name+"/", e.mode
		}
		if err := tw.WriteHeader(h); err != nil {
			return nil, err
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	// compress/gzip writes no name and a zero time unless told: the bytes depend on the tar only.
	var gz bytes.Buffer
	zw, err := gzip.NewWriterLevel(&gz, gzip.BestCompression)
	if err != nil {
		return nil, err
	}
	if _, err := zw.Write(raw.Bytes()); err != nil {
		return nil, err
	}
	if err := zw.Close(); err != nil {
		return nil, err
	}
	blob := gz.Bytes()
	return tarball.LayerFromOpener(func() (io.ReadCloser, error) {
		return io.NopCloser(bytes.NewReader(blob)), nil
	}, tarball.WithMediaType(types.OCILayer))
}

// write puts img in outDir as the OCI image layout NAME/ and its tar NAME.tar.
func write(img v1.Image, outDir, name, ref, tag string, created time.Time) (Result, error) {
	r := Result{Name: name, Ref: ref, Layout: filepath.Join(outDir, name), Tar: filepath.Join(outDir, name+".tar")}
	var err error
	if r.Digest, err = img.Digest(); err != nil {
		return r, err
	}
	if err := os.RemoveAll(r.Layout); err != nil {
		return r, err
	}
	p, err := layout.Write(r.Layout, empty.Index)
	if err != nil {
		return r, err
	}
	if err := p.AppendImage(img, layout.WithPlatform(Platform()), layout.WithAnnotations(map[string]string{
		annotationImageName: normalize(ref),
		annotationRefName:   tag,
	})); err != nil {
		return r, err
	}
	if r.TarSize, err = archive(r.Layout, r.Tar, created); err != nil {
		return r, err
	}
	return r, nil
}

// normalize is ref as containerd and kubelet's CRI name it: keyward/x:t is docker.io/keyward/x:t.
func normalize(ref string) string {
	first, _, _ := strings.Cut(ref, "/")
	if !strings.ContainsAny(first, ".:") && first != "localhost" {
		return "docker.io/" + ref
	}
	return ref
}

// archive writes the directory dir as a tar at out (through a temporary file), sorted, with fixed
// ownership, modes and times, and returns its size.
func archive(dir, out string, created time.Time) (int64, error) {
	tmp, err := os.CreateTemp(filepath.Dir(out), ".tmp-"+filepath.Base(out))
	if err != nil {
		return 0, err
	}
	defer os.Remove(tmp.Name())
	tw := tar.NewWriter(tmp)
	err = filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error { // lexical order
		if err != nil || p == dir {
			return err
		}
		rel, err := filepath.Rel(dir, p)
		if err != nil {
			return err
		}
		h := &tar.Header{Name: filepath.ToSlash(rel), ModTime: created, Mode: 0o644, Typeflag: tar.TypeReg}
		if d.IsDir() {
			h.Name, h.Mode, h.Typeflag = h.Name+"/", 0o755, tar.TypeDir
			return tw.WriteHeader(h)
		}
		if !d.Type().IsRegular() {
			return fmt.Errorf("%s: not a regular file", p)
		}
		f, err := os.Open(p)
		if err != nil {
			return err
		}
		defer f.Close()
		st, err := f.Stat()
		if err != nil {
			return err
		}
		h.Size = st.Size()
		if err := tw.WriteHeader(h); err != nil {
			return err
		}
		_, err = io.Copy(tw, f)
		return err
	})
	if err == nil {
		err = tw.Close()
	}
	if err == nil {
		err = tmp.Close()
	} else {
		tmp.Close()
	}
	if err != nil {
		return 0, err
	}
	st, err := os.Stat(tmp.Name())
	if err != nil {
		return 0, err
	}
	return st.Size(), os.Rename(tmp.Name(), out)
}
