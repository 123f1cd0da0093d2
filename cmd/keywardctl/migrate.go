package main

import (
	"context"
	"fmt"
	"os"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
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
	m := migration{e: e, client: client, stateFile: *stateFile, pageSize: *pageSize}
	if b, err := os.ReadFile(*stateFile); err == nil {
		m.after = strings.TrimSpace(string(b))
		fmt.Fprintf(e.stdout, "resuming after %s\n", m.after)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Hour)
	defer cancel()
	if err := m.run(ctx); err != nil {
		return err
	}
	os.Remove(*stateFile)
	fmt.Fprintf(e.stdout, "done: %d Secret(s) rewritten, %d already done in an earlier run; check with keywardctl kms coverage\n", m.done, m.skipped)
	return nil
}

// migration rewrites Secrets page by page, after the one named in its state file.
type migration struct {
	e             streams
	client        kubernetes.Interface
	stateFile     string
	pageSize      int64
	after         string
	done, skipped int
}

func (m *migration) run(ctx context.Context) error {
	cont := ""
	start := time.Now()
	for {
		list, err := m.client.CoreV1().Secrets("").List(ctx, metav1.ListOptions{Limit: m.pageSize, Continue: cont})
		if err != nil {
			return fmt.Errorf("listing Secrets: %w", err)
		}
		for i := range list.Items {
			if err := m.rewrite(ctx, &list.Items[i]); err != nil {
				return err
			}
		}
		fmt.Fprintf(m.e.stdout, "rewrote %d Secret(s) so far (%s)\n", m.done, time.Since(start).Round(time.Millisecond))
		if cont = list.Continue; cont == "" {
			return nil
		}
	}
}

// rewrite updates one Secret unchanged (kube-apiserver re-encrypts it) and records the progress.
func (m *migration) rewrite(ctx context.Context, s *corev1.Secret) error {
	key := s.Namespace + "/" + s.Name
	if m.after != "" && key <= m.after {
		m.skipped++
		return nil
	}
	_, err := m.client.CoreV1().Secrets(s.Namespace).Update(ctx, s, metav1.UpdateOptions{})
	if apierrors.IsConflict(err) || apierrors.IsNotFound(err) {
		err = nil // changed or deleted since listed: the new write is already under the current key
	}
	if err != nil {
		return fmt.Errorf("rewriting %s (progress saved in %s; run again to resume): %w", key, m.stateFile, err)
	}
	m.done++
	return os.WriteFile(m.stateFile, []byte(key+"\n"), 0o600)
}
