package main

import (
	"encoding/json"
	"fmt"
	"os"
	"text/tabwriter"
	"time"

	"github.com/keyward/keyward/internal/audit"
)

func auditCommand(e streams, args []string) error {
	if len(args) == 0 {
		return fmt.Errorf("audit: want verify, query, follow or node-key: %w", errUsage)
	}
	switch args[0] {
	case "verify":
		return auditVerify(e, args[1:])
	case "query":
		return auditQuery(e, args[1:])
	case "node-key":
		return auditNodeKey(e, args[1:])
	case "follow":
		return auditFollow(e, args[1:])
	default:
		return fmt.Errorf("audit: unknown command %q: %w", args[0], errUsage)
	}
}

func auditVerify(e streams, args []string) error {
	fs := newFlags("audit verify", e)
	keyFile := fs.String("key-file", "", "file holding the node's audit HMAC key")
	masterFile := fs.String("master-key-file", "", "file holding the master key node keys are derived from (instead of --key-file; needs --node)")
	var o audit.VerifyOptions
	fs.StringVar(&o.Node, "node", "", "the node the stream must be from")
	fs.StringVar(&o.Stream, "stream", "", "the stream it must be: kms or broker")
	cpFile := fs.String("checkpoint", "", "file with the stream's checkpoints (the log shipper's copy of stdout): the newest of this node's and stream's must be in the chain")
	cpKey := fs.String("checkpoint-pubkey", "", "PEM public key of keyward-kms's HSM checkpoint key (keywardctl kms checkpoint-key export): the checkpoint must carry a valid signature under it")
	pos, err := parse(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 1 {
		return fmt.Errorf("audit verify takes one DIR (or segment FILE): %w", errUsage)
	}
	if o.Key, err = verifyKey(*keyFile, *masterFile, o.Node); err != nil {
		return err
	}
	if *cpKey != "" {
		if *cpFile == "" {
			return fmt.Errorf("--checkpoint-pubkey needs --checkpoint: %w", errUsage)
		}
		if o.CheckpointKey, err = audit.ReadCheckpointKey(*cpKey); err != nil {
			return err
		}
	}
	if *cpFile != "" {
		if o.Node == "" || o.Stream == "" {
			return fmt.Errorf("--checkpoint needs --node and --stream: %w", errUsage)
		}
		fh, err := os.Open(*cpFile)
		if err != nil {
			return err
		}
		o.Checkpoint, err = audit.ReadCheckpoint(fh, o.Node, o.Stream)
		fh.Close()
		if err != nil {
			return err
		}
	}
	rep, err := audit.VerifyPath(pos[0], o)
	if err != nil {
		return err
	}
	fmt.Fprintf(e.stdout, "%s: node %s, stream %s, key %s: records %d..%d (%d) in %d segment(s), hash chain intact",
		pos[0], rep.Node, rep.Stream, rep.KeyID, rep.FirstSeq, rep.LastSeq, rep.Records, rep.Segments)
	if rep.Pruned > 0 {
		fmt.Fprintf(e.stdout, "; records 1..%d were in deleted segments (audit_pruned)", rep.Pruned)
	}
	if o.Checkpoint != nil {
		fmt.Fprintf(e.stdout, "; checkpoint of record %d matches", o.Checkpoint.Seq)
		if o.CheckpointKey != nil {
			fmt.Fprint(e.stdout, " and its signature verifies")
		}
	}
	if rep.Partial > 0 {
		fmt.Fprintf(e.stdout, "; a partial record (%d bytes: a crash or a write in progress) at the end was not checked", rep.Partial)
	}
	fmt.Fprintln(e.stdout)
	return nil
}

// verifyKey is the key to verify with: the node's own, or derived from the master for --node.
func verifyKey(keyFile, masterFile, node string) ([]byte, error) {
	switch {
	case (keyFile == "") == (masterFile == ""):
		return nil, fmt.Errorf("give one of --key-file and --master-key-file: %w", errUsage)
	case keyFile != "":
		return audit.ReadKey(keyFile)
	case node == "":
		return nil, fmt.Errorf("--master-key-file needs --node: %w", errUsage)
	}
	master, err := audit.ReadKey(masterFile)
	if err != nil {
		return nil, err
	}
	return audit.NodeKey(master, node), nil
}

// auditNodeKey writes a node's audit key, derived from the master key, to a new file (mode 0400):
// the file to provision on that node as its --audit-key-file.
func auditNodeKey(e streams, args []string) error {
	fs := newFlags("audit node-key", e)
	masterFile := fs.String("master-key-file", "", "file holding the master key (keep it off the nodes)")
	node := fs.String("node", "", "the node's name")
	out := fs.String("out", "", "file to create with the node's key")
	if _, err := parse(fs, args); err != nil {
		return err
	}
	if *masterFile == "" || *node == "" || *out == "" {
		return fmt.Errorf("audit node-key needs --master-key-file, --node and --out: %w", errUsage)
	}
	master, err := audit.ReadKey(*masterFile)
	if err != nil {
		return err
	}
	f, err := os.OpenFile(*out, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o400)
	if err != nil {
		return err
	}
	if _, err := f.Write(audit.NodeKey(master, *node)); err != nil {
		f.Close()
		os.Remove(*out)
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	fmt.Fprintf(e.stdout, "wrote node %s's audit key (id %s) to %s\n", *node, audit.KeyID(audit.NodeKey(master, *node)), *out)
	return nil
}

func auditQuery(e streams, args []string) error {
	fs := newFlags("audit query", e)
	var f audit.Filter
	fs.StringVar(&f.Decision, "decision", "", "allow, deny or error")
	fs.StringVar(&f.Namespace, "namespace", "", "the subject's namespace")
	fs.StringVar(&f.Event, "event", "", "authenticate, authorize, fetch, mount, unmount, kms_encrypt, kms_decrypt, policy_reload, audit_*")
	since := fs.Duration("since", 0, "only records newer than this (e.g. 1h)")
	output := fs.String("o", "table", "output: table or json (one record per line)")
	pos, err := parse(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 1 {
		return fmt.Errorf("audit query takes one DIR (or segment FILE): %w", errUsage)
	}
	if *since > 0 {
		f.Since = time.Now().Add(-*since)
	}
	recs, err := audit.QueryPath(pos[0], f)
	if err != nil {
		return err
	}
	return printRecords(e, recs, *output)
}

func printRecords(e streams, recs []audit.Record, output string) error {
	if output == "json" {
		enc := json.NewEncoder(e.stdout)
		for _, r := range recs {
			if err := enc.Encode(r); err != nil {
				return err
			}
		}
		return nil
	}
	tw := tabwriter.NewWriter(e.stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "TIME\tEVENT\tDECISION\tCODE\tNAMESPACE/POD\tREF\tREASON")
	for _, r := range recs {
		who := r.Subject.Namespace + "/" + r.Subject.Pod
		if who == "/" {
			who = "-"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", r.Time.Format(time.RFC3339), r.Type, r.Decision, r.Code, who, r.Object.Ref, r.Reason)
	}
	return tw.Flush()
}
