package main

import (
	"context"
	"fmt"
	"os"
	"strings"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
)

// migrateCommand rewrites every Secret through the API (an unchanged update): kube-apiserver
// re-encrypts objects whose stored form is stale (another key ID, or another provider) under the
// current key. It pages through Secrets in name order and records the last one done in a state file,
// so an interrupted run resumes where it stopped.
func migrateCommand(e streams, args []string) error {
	fs := newFlags("kms migrate", e)
	kubeconfig := fs.String("kubeconfig", os.Getenv("KUBECONFIG"), "kubeconfig of a user that may get, list and update Secrets")
	stateFile := fs.String("state", "keyward-migrate.state", "progress file: the last Secret rewritten (namespace/name)")
	pageSize := fs.Int64("page", 100, "Secrets per list request")
	if _, err := parse(fs, args); err != nil {
		return err
	}
	if *kubeconfig == "" {
		return fmt.Errorf("--kubeconfig is required: %w", errUsage)
	}
	cfg, err := clientcmd.BuildConfigFromFlags("", *kubeconfig)
	if err != nil {
		return err
	}
	cfg.QPS, cfg.Burst = 50, 100
	client, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return err
	}
	after := ""
	if b, err := os.ReadFile(*stateFile); err == nil {
		after = strings.TrimSpace(string(b))
		fmt.Fprintf(e.stdout, "resuming after %s\n", after)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Hour)
	defer cancel()
	done, skipped, cont := 0, 0, ""
	start := time.Now()
	for {
		list, err := client.CoreV1().Secrets("").List(ctx, metav1.ListOptions{Limit: *pageSize, Continue: cont})
		if err != nil {
			return fmt.Errorf("listing Secrets: %w", err)
		}
		for i := range list.Items {
			s := &list.Items[i]
			key := s.Namespace + "/" + s.Name
			if after != "" && key <= after {
				skipped++
				continue
			}
			_, err := client.CoreV1().Secrets(s.Namespace).Update(ctx, s, metav1.UpdateOptions{})
			if apierrors.IsConflict(err) || apierrors.IsNotFound(err) {
				err = nil // changed or deleted since listed: the new write is already under the current key
			}
			if err != nil {
				return fmt.Errorf("rewriting %s (progress saved in %s; run again to resume): %w", key, *stateFile, err)
			}
			done++
			if err := os.WriteFile(*stateFile, []byte(key+"\n"), 0o600); err != nil {
				return err
			}
		}
		fmt.Fprintf(e.stdout, "rewrote %d Secret(s) so far (%s)\n", done, time.Since(start).Round(time.Millisecond))
		if cont = list.Continue; cont == "" {
			break
		}
	}
	os.Remove(*stateFile)
	fmt.Fprintf(e.stdout, "done: %d Secret(s) rewritten, %d already done in an earlier run; check with keywardctl kms coverage\n", done, skipped)
	return nil
}
