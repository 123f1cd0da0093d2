package main

import (
	"encoding/json"
	"fmt"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/keyward/keyward/internal/audit"
)

// whoHas answers, from the broker's audit streams (one directory per node), which pods received
// which Vault version of a ref, and whether that is the newest version any pod received.
func whoHas(e streams, args []string) error {
	fs := newFlags("who-has", e)
	env := fs.String("environment", "", "only this environment (a ref names a secret per environment)")
	namespace := fs.String("namespace", "", "only pods of this namespace")
	since := fs.Duration("since", 0, "only deliveries newer than this (e.g. 10m: pods republished lately, i.e. running)")
	all := fs.Bool("all", false, "also list volumes unpublished since their last delivery")
	output := fs.String("o", "table", "output: table or json")
	live := fs.Bool("live", false, "ask the nodes' Admin API for their live volumes (every node of the DaemonSet, or --node / --addr) instead of reading audit streams")
	var a apiFlags
	a.bind(fs, true)
	pos, err := parse(fs, args)
	if err != nil {
		return err
	}
	if *output != "table" && *output != "json" {
		return fmt.Errorf("-o %q: want table or json: %w", *output, errUsage)
	}
	if *live {
		if len(pos) != 1 || *since > 0 || *all {
			return fmt.Errorf("who-has --live takes REF[#KEY] only (no DIRs, --since or --all: it shows the volumes live now): %w", errUsage)
		}
		if a.node == "" && a.addr == "" {
			a.allNodes = true
		}
		ref, key, _ := strings.Cut(pos[0], "#")
		return whoHasLive(e, &a, ref, key, *env, *namespace, *output)
	}
	if len(pos) < 2 {
		return fmt.Errorf("who-has takes REF[#KEY] and one or more audit stream DIRs (one per node): %w", errUsage)
	}
	ref, key, _ := strings.Cut(pos[0], "#")
	q := holdersQuery{ref: ref, key: key, environment: *env, namespace: *namespace, all: *all}
	if *since > 0 {
		q.since = time.Now().Add(-*since)
	}
	var recs []audit.Record
	for _, dir := range pos[1:] {
		r, err := audit.QueryPath(dir, audit.Filter{})
		if err != nil {
			return fmt.Errorf("%s: %w", dir, err)
		}
		recs = append(recs, r...)
	}
	return printHolders(e, q.holders(recs), *output, pos[0])
}

// printHolders prints who-has's answer.
func printHolders(e streams, res []Holders, output, asked string) error {
	if output == "json" {
		enc := json.NewEncoder(e.stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(res)
	}
	tw := tabwriter.NewWriter(e.stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "ENVIRONMENT\tREF\tNAMESPACE/POD\tNODE\tVERSION\tNEWEST\tLAST DELIVERED")
	for _, r := range res {
		for _, h := range r.Pods {
			v, newest := "?", "unknown"
			if h.Version > 0 {
				v, newest = fmt.Sprint(h.Version), map[bool]string{true: "yes", false: "no"}[h.Newest]
			}
			if h.Unpublished {
				newest += " (unpublished)"
			}
			fmt.Fprintf(tw, "%s\t%s\t%s/%s\t%s\t%s\t%s\t%s\n", r.Environment, r.Ref, h.Namespace, h.Pod, h.Node, v, newest, h.LastDelivered.Format(time.RFC3339))
		}
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	for _, r := range res {
		fmt.Fprintf(e.stdout, "%s %s: newest version %d; %d of %d pods have it\n", r.Environment, r.Ref, r.Newest, r.Current, len(r.Pods))
	}
	if len(res) == 0 {
		fmt.Fprintf(e.stdout, "no pod received %s in these streams\n", asked)
	}
	return nil
}

// Holders is who-has's answer for one ref#key in one environment (its -o json).
type Holders struct {
	Environment string `json:"environment"`
	Ref         string `json:"ref"` // "payments/db#password"
	// Newest is the highest Vault version any pod received; Current how many of Pods hold it.
	Newest  int      `json:"newest"`
	Current int      `json:"current"`
	Pods    []Holder `json:"pods"`
}

// Holder is one pod's last delivery of the ref.
type Holder struct {
	Namespace string `json:"namespace"`
	Pod       string `json:"pod"`
	PodUID    string `json:"pod_uid"`
	Node      string `json:"node"`
	// Version is the Vault version delivered last (0: unknown, a record older than per-ref versions).
	Version       int       `json:"version"`
	Newest        bool      `json:"newest"`
	LastDelivered time.Time `json:"last_delivered"`
	// Unpublished: the volume was unpublished after that delivery (listed with --all only).
	Unpublished bool `json:"unpublished,omitempty"`
}

type holdersQuery struct {
	ref, key, environment, namespace string
	since                            time.Time
	all                              bool
}

// holders reads allowed fetch and mount records for the ref: per environment and key, each pod's
// last delivery (a CSI volume's, per volume: an unmount record of the volume after it marks it
// unpublished), and the newest version delivered.
func (q holdersQuery) holders(recs []audit.Record) []Holders {
	sort.SliceStable(recs, func(i, j int) bool { return recs[i].Time.Before(recs[j].Time) })
	type slot struct {
		env, refKey, pod, volume string
	}
	last := map[slot]*Holder{}
	volumes := map[string][]slot{} // volume ID -> its slots
	for _, r := range recs {
		if r.Type == audit.EventUnmount {
			for _, s := range volumes[r.RequestID] {
				if h := last[s]; h != nil && !r.Time.Before(h.LastDelivered) {
					h.Unpublished = true
				}
			}
			continue
		}
		if (r.Type != audit.EventMount && r.Type != audit.EventFetch) || r.Decision != audit.Allowed ||
			(q.environment != "" && r.Object.Environment != q.environment) || (q.namespace != "" && r.Subject.Namespace != q.namespace) {
			continue
		}
		refs, keys := strings.Split(r.Object.Ref, ","), strings.Split(r.Object.Key, ",")
		if len(keys) != len(refs) {
			continue
		}
		volume := "" // a provider fetch: per pod
		if r.Type == audit.EventMount {
			volume, _, _ = strings.Cut(r.RequestID, "/") // "<volume id>/<nonce>"
		}
		for i := range refs {
			if refs[i] != q.ref || (q.key != "" && keys[i] != q.key) {
				continue
			}
			version := 0
			switch {
			case len(r.Object.Versions) == len(refs):
				version = r.Object.Versions[i]
			case len(refs) == 1:
				version = r.Object.Version
			}
			s := slot{env: r.Object.Environment, refKey: refs[i] + "#" + keys[i], pod: r.Subject.PodUID, volume: volume}
			if last[s] == nil && r.Type == audit.EventMount {
				volumes[volume] = append(volumes[volume], s)
			}
			last[s] = &Holder{Namespace: r.Subject.Namespace, Pod: r.Subject.Pod, PodUID: r.Subject.PodUID, Node: r.Subject.Node,
				Version: version, LastDelivered: r.Time}
		}
	}
	byRef := map[[2]string]*Holders{}
	for s, h := range last {
		if h.LastDelivered.Before(q.since) || (h.Unpublished && !q.all) {
			continue
		}
		k := [2]string{s.env, s.refKey}
		if byRef[k] == nil {
			byRef[k] = &Holders{Environment: s.env, Ref: s.refKey}
		}
		byRef[k].Pods = append(byRef[k].Pods, *h)
	}
	var out []Holders
	for _, r := range byRef {
		for _, h := range r.Pods {
			r.Newest = max(r.Newest, h.Version)
		}
		for i := range r.Pods {
			if r.Pods[i].Newest = r.Newest > 0 && r.Pods[i].Version == r.Newest; r.Pods[i].Newest && !r.Pods[i].Unpublished {
				r.Current++
			}
		}
		sort.Slice(r.Pods, func(i, j int) bool {
			a, b := r.Pods[i], r.Pods[j]
			if a.Namespace+"/"+a.Pod != b.Namespace+"/"+b.Pod {
				return a.Namespace+"/"+a.Pod < b.Namespace+"/"+b.Pod
			}
			return a.LastDelivered.Before(b.LastDelivered)
		})
		out = append(out, *r)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Environment+out[i].Ref < out[j].Environment+out[j].Ref })
	return out
}
