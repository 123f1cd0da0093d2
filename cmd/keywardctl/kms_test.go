package main

import (
	"bytes"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"strings"
	"testing"

	p11 "github.com/miekg/pkcs11"

	"github.com/keyward/keyward/test/harness"
)

// importKey is the attack keywardctl must expose: an AES-256 key of known value imported into the
// token as the next generation, marked sensitive and non-extractable.
func importKey(t *testing.T, h *harness.SoftHSM, label string) {
	t.Helper()
	p := p11.New(h.Module)
	if p == nil {
		t.Fatal("cannot load the PKCS#11 module")
	}
	defer p.Destroy()
	if err := p.Initialize(); err != nil {
		t.Fatal(err)
	}
	defer p.Finalize()
	s, err := p.OpenSession(h.Slot, p11.CKF_SERIAL_SESSION|p11.CKF_RW_SESSION)
	if err != nil {
		t.Fatal(err)
	}
	defer p.CloseSession(s)
	if err := p.Login(s, p11.CKU_USER, h.UserPIN); err != nil {
		t.Fatal(err)
	}
	id := make([]byte, 16)
	rand.Read(id)
	if _, err := p.CreateObject(s, []*p11.Attribute{
		p11.NewAttribute(p11.CKA_CLASS, p11.CKO_SECRET_KEY),
		p11.NewAttribute(p11.CKA_KEY_TYPE, p11.CKK_AES),
		p11.NewAttribute(p11.CKA_TOKEN, true),
		p11.NewAttribute(p11.CKA_PRIVATE, true),
		p11.NewAttribute(p11.CKA_SENSITIVE, true),
		p11.NewAttribute(p11.CKA_EXTRACTABLE, false),
		p11.NewAttribute(p11.CKA_ENCRYPT, true),
		p11.NewAttribute(p11.CKA_DECRYPT, true),
		p11.NewAttribute(p11.CKA_LABEL, label),
		p11.NewAttribute(p11.CKA_ID, id),
		p11.NewAttribute(p11.CKA_VALUE, bytes.Repeat([]byte{0x42}, 32)),
	}); err != nil {
		t.Fatal(err)
	}
}

// `kms keys list` says for each generation whether keyward-kms accepts it, and why not: an imported
// key labelled as the next generation is listed as refused, and the current generation is still the
// generated one.
func TestKeysListShowsRefusedGenerations(t *testing.T) {
	h := harness.SoftHSMT(t, "keyward")
	cfg := t.TempDir() + "/kms.yaml"
	writeFile(t, cfg, fmt.Sprintf("pkcs11:\n  module: %s\n  tokenLabel: %s\n  pinFile: %s\n  keyLabel: kek\n", h.Module, h.TokenLabel, h.PINFile))
	ctl := func(args ...string) string {
		t.Helper()
		var out, errb bytes.Buffer
		if code := run(args, &out, &errb); code != 0 {
			t.Fatalf("%v: exit %d: %s%s", args, code, out.String(), errb.String())
		}
		return out.String()
	}
	ctl("kms", "keys", "create", "--config", cfg)
	importKey(t, h, "kek.2")

	table := ctl("kms", "keys", "list", "--config", cfg)
	lines := strings.Split(strings.TrimSpace(table), "\n")
	if len(lines) != 3 || !strings.Contains(lines[0], "ACCEPTABLE") {
		t.Fatalf("table:\n%s", table)
	}
	if f := strings.Fields(lines[1]); f[0] != "1" || f[3] != "true" || f[4] != "yes" {
		t.Errorf("generation 1: %q", lines[1])
	}
	if f := strings.Fields(lines[2]); f[0] != "2" || f[3] != "false" || f[4] != "no:" || !strings.Contains(lines[2], "CKA_LOCAL=false") {
		t.Errorf("generation 2: %q", lines[2])
	}

	var rows []struct {
		Generation int    `json:"generation"`
		Usable     bool   `json:"usable"`
		Current    bool   `json:"current"`
		Refusal    string `json:"refusal"`
	}
	if err := json.Unmarshal([]byte(ctl("kms", "keys", "list", "--config", cfg, "-o", "json")), &rows); err != nil {
		t.Fatal(err)
	}
	if len(rows) != 2 || !rows[0].Usable || !rows[0].Current || rows[1].Usable || rows[1].Current ||
		!strings.Contains(rows[1].Refusal, "CKA_LOCAL=false") {
		t.Errorf("json rows: %+v", rows)
	}
}
