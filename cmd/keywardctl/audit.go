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
		return fmt.Errorf("audit: want verify or query: %w", errUsage)
	}
	switch args[0] {
	case "verify":
		return auditVerify(e, args[1:])
	case "query":
		return auditQuery(e, args[1:])
	default:
		return fmt.Errorf("audit: unknown command %q: %w", args[0], errUsage)
	}
}

func auditVerify(e streams, args []string) error {
	fs := newFlags("audit verify", e)
	keyFile := fs.String("key-file", "/etc/keyward/audit.key", "file holding the audit HMAC key")
	pos, err := parse(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 1 {
		return fmt.Errorf("audit verify takes one FILE: %w", errUsage)
	}
	rep, err := audit.VerifyFile(pos[0], *keyFile)
	if err != nil {
		return err
	}
	fmt.Fprintf(e.stdout, "%s: %d record(s), hash chain intact\n", pos[0], rep.Records)
	return nil
}

func auditQuery(e streams, args []string) error {
	fs := newFlags("audit query", e)
	var f audit.Filter
	fs.StringVar(&f.Decision, "decision", "", "allow, deny or error")
	fs.StringVar(&f.Namespace, "namespace", "", "the subject's namespace")
	fs.StringVar(&f.Event, "event", "", "authenticate, authorize, fetch, mount, unmount, kms_encrypt, kms_decrypt, policy_reload")
	since := fs.Duration("since", 0, "only records newer than this (e.g. 1h)")
	output := fs.String("o", "table", "output: table or json (one record per line)")
	pos, err := parse(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 1 {
		return fmt.Errorf("audit query takes one FILE: %w", errUsage)
	}
	if *since > 0 {
		f.Since = time.Now().Add(-*since)
	}
	fh, err := os.Open(pos[0])
	if err != nil {
		return err
	}
	defer fh.Close()
	recs, err := audit.Query(fh, f)
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
