package main

import (
	"context"
	"encoding/json"
	"fmt"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	adminv1 "github.com/keyward/keyward/proto/keyward/admin/v1"
)

// eachNode calls f with an Admin client for every target of a, in node order; a node that cannot be
// reached is reported through f's error, not fatal to the others.
func eachNode(ctx context.Context, a *apiFlags, f func(t target, c adminv1.AdminClient) error) error {
	ts, err := a.targets(ctx)
	if err != nil {
		return err
	}
	for _, t := range ts {
		cc, err := a.dial(t)
		if err != nil {
			return err
		}
		err = f(t, adminv1.NewAdminClient(cc))
		cc.Close()
		if err != nil {
			return err
		}
	}
	return nil
}

// answeredAs checks that a daemon answers as the node asked for (t.node; with --addr and no --node
// there is none to compare): a node's answers are never shown under another node's name.
func answeredAs(t target, node string) error {
	if t.node != "" && node != t.node {
		return fmt.Errorf("node %s (%s) answered as node %q: not the node asked for", t.node, t.addr, node)
	}
	return nil
}

func adminContext() (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), 30*time.Second)
}

// volumes lists the live volumes of one node or every node, from their Admin service.
func volumesCommand(e streams, args []string) error {
	fs := newFlags("volumes", e)
	var a apiFlags
	a.bind(fs, true)
	namespace := fs.String("namespace", "", "only volumes of pods in this namespace")
	output := fs.String("o", "table", "output: table or json")
	if _, err := parse(fs, args); err != nil {
		return err
	}
	ctx, cancel := adminContext()
	defer cancel()
	var all []*adminv1.ListVolumesResponse
	err := eachNode(ctx, &a, func(t target, c adminv1.AdminClient) error {
		r, err := c.ListVolumes(ctx, &adminv1.ListVolumesRequest{Namespace: *namespace})
		if err != nil {
			return fmt.Errorf("node %s (%s): %w", t.node, t.addr, err)
		}
		if err := answeredAs(t, r.GetNode()); err != nil {
			return err
		}
		all = append(all, r)
		return nil
	})
	if err != nil {
		return err
	}
	if *output == "json" {
		return printProto(e, all)
	}
	tw := tabwriter.NewWriter(e.stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "NODE\tNAMESPACE/POD\tVOLUME\tENVIRONMENT\tREF\tVAULT VERSION\t..VERSION\tSINCE")
	for _, r := range all {
		for _, v := range r.GetVolumes() {
			for _, ref := range v.GetRefs() {
				fmt.Fprintf(tw, "%s\t%s/%s\t%s\t%s\t%s\t%d\t%d\t%s\n", r.GetNode(), v.GetNamespace(), v.GetPod(), v.GetVolumeId(), v.GetEnvironment(),
					ref.GetRef(), ref.GetVaultVersion(), v.GetVersion(), v.GetSince().AsTime().Format(time.RFC3339))
			}
			// A dynamic credential shows its lease's hash and end where a stored secret shows its version.
			for _, l := range v.GetLeases() {
				fmt.Fprintf(tw, "%s\t%s/%s\t%s\t%s\t%s\tlease %s, ends %s\t%d\t%s\n", r.GetNode(), v.GetNamespace(), v.GetPod(), v.GetVolumeId(), v.GetEnvironment(),
					l.GetName(), l.GetLeaseSha256(), l.GetExpires().AsTime().Format(time.RFC3339), v.GetVersion(), v.GetSince().AsTime().Format(time.RFC3339))
			}
		}
	}
	return tw.Flush()
}

// statusCommand shows each node's health (with reasons), policy and Vault tokens; exit 1 if any is
// unhealthy.
func statusCommand(e streams, args []string) error {
	fs := newFlags("status", e)
	var a apiFlags
	a.bind(fs, true)
	output := fs.String("o", "table", "output: table or json")
	if _, err := parse(fs, args); err != nil {
		return err
	}
	ctx, cancel := adminContext()
	defer cancel()
	type nodeStatus struct {
		Health      json.RawMessage `json:"health"`
		Policy      json.RawMessage `json:"policy,omitempty"`
		VaultTokens json.RawMessage `json:"vault_tokens,omitempty"`
	}
	var out []nodeStatus
	tw := tabwriter.NewWriter(e.stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "NODE\tCOMPONENT\tVERSION\tHEALTHY\tPOLICY\tVAULT TOKENS\tREASONS")
	unhealthy := 0
	err := eachNode(ctx, &a, func(t target, c adminv1.AdminClient) error {
		h, err := c.GetHealth(ctx, &adminv1.GetHealthRequest{})
		if err != nil {
			return fmt.Errorf("node %s (%s): %w", t.node, t.addr, err)
		}
		if err := answeredAs(t, h.GetNode()); err != nil {
			return err
		}
		ns := nodeStatus{Health: mustJSON(h)}
		policy, tokens := "-", "-"
		if p, err := c.GetPolicy(ctx, &adminv1.GetPolicyRequest{}); err == nil {
			policy, ns.Policy = fmt.Sprintf("gen %d, %s", p.GetGeneration(), p.GetHash()), mustJSON(p)
		} else if status.Code(err) != codes.Unimplemented {
			return fmt.Errorf("node %s: %w", t.node, err)
		}
		if v, err := c.ListVaultTokens(ctx, &adminv1.ListVaultTokensRequest{}); err == nil {
			if err := answeredAs(t, v.GetNode()); err != nil {
				return err
			}
			tokens, ns.VaultTokens = fmt.Sprintf("%d (%s mode)", len(v.GetTokens()), v.GetMode()), mustJSON(v)
		} else if status.Code(err) != codes.Unimplemented {
			return fmt.Errorf("node %s: %w", t.node, err)
		}
		var reasons []string
		for _, c := range h.GetChecks() {
			if !c.GetOk() {
				reasons = append(reasons, c.GetName()+": "+c.GetReason())
			}
		}
		if !h.GetHealthy() {
			unhealthy++
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%v\t%s\t%s\t%s\n", h.GetNode(), h.GetComponent(), h.GetVersion(), h.GetHealthy(), policy, tokens, strings.Join(reasons, "; "))
		out = append(out, ns)
		return nil
	})
	if err != nil {
		return err
	}
	if *output == "json" {
		enc := json.NewEncoder(e.stdout)
		enc.SetIndent("", "  ")
		if err := enc.Encode(out); err != nil {
			return err
		}
	} else if err := tw.Flush(); err != nil {
		return err
	}
	if unhealthy > 0 {
		return fmt.Errorf("%d node(s) unhealthy", unhealthy)
	}
	return nil
}

// whoHasLive answers who-has from the nodes' live volumes (Admin.ListVolumes), not the audit files.
func whoHasLive(e streams, a *apiFlags, ref, key, env, namespace, output string) error {
	ctx, cancel := adminContext()
	defer cancel()
	byRef := map[[2]string]*Holders{}
	err := eachNode(ctx, a, func(t target, c adminv1.AdminClient) error {
		r, err := c.ListVolumes(ctx, &adminv1.ListVolumesRequest{Namespace: namespace})
		if err != nil {
			return fmt.Errorf("node %s (%s): %w", t.node, t.addr, err)
		}
		if err := answeredAs(t, r.GetNode()); err != nil {
			return err
		}
		for _, v := range r.GetVolumes() {
			if env != "" && v.GetEnvironment() != env {
				continue
			}
			for _, rv := range v.GetRefs() {
				r0, k0, _ := strings.Cut(rv.GetRef(), "#")
				if r0 != ref || (key != "" && k0 != key) {
					continue
				}
				k := [2]string{v.GetEnvironment(), rv.GetRef()}
				if byRef[k] == nil {
					byRef[k] = &Holders{Environment: v.GetEnvironment(), Ref: rv.GetRef()}
				}
				byRef[k].Pods = append(byRef[k].Pods, Holder{Namespace: v.GetNamespace(), Pod: v.GetPod(), PodUID: v.GetPodUid(), Node: r.GetNode(),
					Version: int(rv.GetVaultVersion()), LastDelivered: v.GetLastDelivered().AsTime()})
			}
		}
		return nil
	})
	if err != nil {
		return err
	}
	var res []Holders
	for _, h := range byRef {
		for _, p := range h.Pods {
			h.Newest = max(h.Newest, p.Version)
		}
		for i := range h.Pods {
			if h.Pods[i].Newest = h.Pods[i].Version == h.Newest; h.Pods[i].Newest {
				h.Current++
			}
		}
		sort.Slice(h.Pods, func(i, j int) bool {
			return h.Pods[i].Namespace+"/"+h.Pods[i].Pod < h.Pods[j].Namespace+"/"+h.Pods[j].Pod
		})
		res = append(res, *h)
	}
	sort.Slice(res, func(i, j int) bool { return res[i].Environment+res[i].Ref < res[j].Environment+res[j].Ref })
	return printHolders(e, res, output, ref)
}

func mustJSON(m proto.Message) json.RawMessage {
	b, _ := protojson.Marshal(m)
	return b
}

func printProto[M proto.Message](e streams, ms []M) error {
	out := []json.RawMessage{}
	for _, m := range ms {
		out = append(out, mustJSON(m))
	}
	enc := json.NewEncoder(e.stdout)
	enc.SetIndent("", "  ")
	return enc.Encode(out)
}
