package coverage

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"strings"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/keyward/keyward/kms/envelope"
)

// Report is the coverage of one etcd prefix.
type Report struct {
	Prefix string
	Total  int
	// ByKeyID counts KMS v2 values per key ID (and provider: "provider/keyID").
	ByKeyID map[string]int
	// Unencrypted lists keys whose value is not KMS v2 (plaintext, identity, aescbc, kms v1...).
	Unencrypted []string
	// Malformed lists keys whose KMS v2 envelope does not parse.
	Malformed []string
}

// Scan reads every value under prefix (default "/registry/secrets/") in pages.
func Scan(ctx context.Context, c *clientv3.Client, prefix string) (Report, error) {
	if prefix == "" {
		prefix = "/registry/secrets/"
	}
	r := Report{Prefix: prefix, ByKeyID: map[string]int{}}
	key := prefix
	end := clientv3.GetPrefixRangeEnd(prefix)
	for {
		resp, err := c.Get(ctx, key, clientv3.WithRange(end), clientv3.WithLimit(500))
		if err != nil {
			return r, fmt.Errorf("etcd get %s: %w", prefix, err)
		}
		for _, kv := range resp.Kvs {
			r.Total++
			env, err := envelope.ParseStored(kv.Value)
			switch {
			case errors.Is(err, envelope.ErrNotKMSv2):
				r.Unencrypted = append(r.Unencrypted, string(kv.Key))
			case err != nil:
				r.Malformed = append(r.Malformed, string(kv.Key))
			default:
				r.ByKeyID[env.Provider+"/"+env.KeyID]++
			}
		}
		if !resp.More || len(resp.Kvs) == 0 {
			break
		}
		key = string(resp.Kvs[len(resp.Kvs)-1].Key) + "\x00"
	}
	sort.Strings(r.Unencrypted)
	sort.Strings(r.Malformed)
	return r, nil
}

// CountKeyID returns how many values are wrapped under keyID, whatever the provider name.
func (r Report) CountKeyID(keyID string) int {
	n := 0
	for k, c := range r.ByKeyID {
		if _, id, _ := strings.Cut(k, "/"); id == keyID {
			n += c
		}
	}
	return n
}
