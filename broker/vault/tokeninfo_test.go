package vault

import (
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"
)

// TokenInfos names each cached token by a hash of its accessor, with its owner and TTL: neither the
// token nor the accessor appears.
func TestTokenInfosHideTokenAndAccessor(t *testing.T) {
	f := &fakeVault{read: kv(map[string]any{"password": "CANARY-value"})}
	s := newSource(t, f)
	if _, err := fetch(s, ref("payments/db", "password")); err != nil {
		t.Fatal(err)
	}
	infos := s.TokenInfos()
	if len(infos) != 1 {
		t.Fatalf("%d tokens", len(infos))
	}
	i := infos[0]
	if i.Namespace != "payments" || i.ServiceAccount != "api" || i.Role != "prod" || i.Environment != "prod" ||
		i.TTL != 600*time.Second || !i.Renewable || i.Holders != 1 || i.AccessorSHA256 != hashAccessor("acc-s.pod-1") {
		t.Fatalf("token info: %+v", i)
	}
	js, _ := json.Marshal(infos)
	for _, canary := range []string{"s.pod-1", "acc-", "CANARY"} {
		if out := fmt.Sprintf("%s %+v", js, infos); strings.Contains(out, canary) {
			t.Errorf("token info carries %q: %s", canary, out)
		}
	}
	if s.Mode() != ModePod {
		t.Errorf("mode %q", s.Mode())
	}
}
