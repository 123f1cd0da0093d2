package vault

import "time"

// TokenInfo is a cached Vault token as an operator may see it (the admin API): a hash of its
// accessor, whose it is and when it lapses; never the token, never the accessor itself.
type TokenInfo struct {
	// AccessorSHA256 is the first 12 hex digits of SHA-256 over the accessor, as the logs name it.
	AccessorSHA256                               string
	Namespace, ServiceAccount, Role, Environment string
	Issued                                       time.Time
	TTL                                          time.Duration
	Renewable                                    bool
	// Holders is how many pods on the node hold it.
	Holders int
}

// TokenInfos lists the Vault tokens the source holds for pods' service accounts (none in broker
// mode, whose one token is the broker's own).
func (s *Source) TokenInfos() []TokenInfo {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]TokenInfo, 0, len(s.tokens))
	for k, t := range s.tokens {
		out = append(out, TokenInfo{AccessorSHA256: t.accessor, Namespace: k.namespace, ServiceAccount: k.serviceAccount,
			Role: k.role, Environment: k.environment, Issued: t.issued, TTL: t.ttl, Renewable: t.renewable, Holders: len(s.holders[k])})
	}
	return out
}

// Mode is the source's Vault mode.
func (s *Source) Mode() Mode { return s.o.Mode }
