package main

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"flag"
	"fmt"
	"sync"
	"syscall"
	"time"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/keyward/keyward/csi"
)

// memory measures the driver's peak resident memory (VmHWM) when 64 publishes of 16 MiB volumes, each
// holding one 15 MiB secret, arrive at once: with the default bounds (--max-concurrent-publishes,
// --max-publish-bytes) against the same driver with the bounds lifted, both with the GOMEMLIMIT the
// DaemonSet sets, a fresh driver per round, contenders alternating.
var gomemlimit = flag.String("gomemlimit", "100MiB", "GOMEMLIMIT of the driver in the memory benchmark (both contenders), as the DaemonSet sets it")

// (Over 60 lines: a measurement script: each round starts a driver, fires the burst and reads its memory.)
func (b *bench) memory(ctx context.Context) error {
	const volumes = 64
	if err := b.provision(ctx, volumes); err != nil {
		return err
	}
	raw := make([]byte, 15<<20*3/4)
	rand.Read(raw)
	if _, err := b.env.Vault.PutKV(ctx, "kv", "prod/payments/big", map[string]any{"v": base64.StdEncoding.EncodeToString(raw)}); err != nil {
		return err
	}
	attrs := map[string]string{csi.AttrSecrets: "- {ref: payments/big, key: v, file: big}", csi.AttrSizeLimit: fmt.Sprint(csi.MaxSizeLimit)}
	contenders := []struct {
		name string
		args []string
	}{
		{"bounded (defaults)", nil},
		{"unbounded", []string{"--max-concurrent-publishes", "1000", "--max-publish-bytes", fmt.Sprint(1 << 40)}},
	}
	type result struct{ peak, after, el []float64 }
	results := make([]result, len(contenders))
	const rounds = 2
	for r := range rounds {
		for i := range contenders {
			ci := (i + r) % len(contenders)
			c := contenders[ci]
			drv, sock, err := b.startDriverEnv([]string{"GOMEMLIMIT=" + *gomemlimit}, c.args...)
			if err != nil {
				return err
			}
			stop := func() { drv.Process.Signal(syscall.SIGTERM); drv.Wait() }
			conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
			if err != nil {
				stop()
				return err
			}
			b.node = csipb.NewNodeClient(conn)
			if err := waitReady(ctx, conn); err != nil {
				stop()
				return err
			}
			var wg sync.WaitGroup
			errs := make([]error, volumes)
			start := time.Now()
			for v := range volumes {
				wg.Go(func() {
					errs[v] = b.publishVolume(ctx, b.pods[v], b.tokens[v], b.target(b.pods[v], "mem"), attrs)
				})
			}
			wg.Wait()
			el := time.Since(start)
			st := procStatus(drv.Process.Pid)
			for v := range volumes {
				t := b.target(b.pods[v], "mem")
				b.node.NodeUnpublishVolume(ctx, &csipb.NodeUnpublishVolumeRequest{VolumeId: "v-mem-" + string(b.pods[v].UID), TargetPath: t})
			}
			conn.Close()
			stop()
			failed, firstErr := 0, error(nil)
			for _, err := range errs {
				if err != nil {
					failed++
					if firstErr == nil {
						firstErr = err
					}
				}
			}
			res := &results[ci]
			res.peak = append(res.peak, float64(st["VmHWM"])/1024)
			res.after = append(res.after, float64(st["VmRSS"])/1024)
			res.el = append(res.el, el.Seconds())
			fmt.Printf("round %d %-20s peak RSS %6.1f MiB  RSS after %6.1f MiB (anonymous %5.1f)  %d publishes in %5.2f s, %d failed",
				r+1, c.name, float64(st["VmHWM"])/1024, float64(st["VmRSS"])/1024, float64(st["RssAnon"])/1024, volumes, el.Seconds(), failed)
			if firstErr != nil {
				fmt.Printf(" (first: %v)", firstErr)
			}
			fmt.Println()
		}
	}
	mean := func(x []float64) float64 {
		s := 0.0
		for _, v := range x {
			s += v
		}
		return s / float64(len(x))
	}
	fmt.Printf("\n64 publishes of 16 MiB volumes (one 15 MiB secret each) at once, %d rounds:\n", rounds)
	fmt.Printf("peak RSS bounded/unbounded: %.2f (%.1f / %.1f MiB); time bounded/unbounded: %.2f (%.2f / %.2f s)\n",
		mean(results[0].peak)/mean(results[1].peak), mean(results[0].peak), mean(results[1].peak),
		mean(results[0].el)/mean(results[1].el), mean(results[0].el), mean(results[1].el))
	return nil
}
