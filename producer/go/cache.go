package embedfleet

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"regexp"
	"strconv"
	"strings"

	"github.com/redis/go-redis/v9"
)

// ModelContract is what the workers publish to Redis at {prefix}:models:{model}:
// enough to compute content hashes and cache keys.
type ModelContract struct {
	Fingerprint string
	Dim         int
	Tasks       []string
	Dimensions  []int
	MaxTokens   int
}

var unsafeModelChars = regexp.MustCompile(`[^A-Za-z0-9_.-]`)

// VectorKey is the Redis key of a cached vector, as the workers write it.
func VectorKey(prefix, model string, dim int, contentHash string) string {
	return fmt.Sprintf("%s:%s:%d:%s", prefix, unsafeModelChars.ReplaceAllString(model, "_"), dim, contentHash)
}

// ContractKey is the Redis key of the model contract.
func ContractKey(prefix, model string) string {
	return prefix + ":models:" + model
}

// ParseModelContract reads the contract HASH; ok is false when it is absent or malformed.
func ParseModelContract(fields map[string]string) (ModelContract, bool) {
	c := ModelContract{Fingerprint: fields["fingerprint"]}
	if c.Fingerprint == "" {
		return c, false
	}
	var err error
	if v := fields["dim"]; v != "" {
		if c.Dim, err = strconv.Atoi(v); err != nil {
			return c, false
		}
	}
	if v := fields["max_tokens"]; v != "" {
		if c.MaxTokens, err = strconv.Atoi(v); err != nil {
			return c, false
		}
	}
	if v := fields["tasks"]; v != "" && json.Unmarshal([]byte(v), &c.Tasks) != nil {
		return c, false
	}
	if v := fields["dimensions"]; v != "" && json.Unmarshal([]byte(v), &c.Dimensions) != nil {
		return c, false
	}
	return c, true
}

// cacheReader reads Redis and fails open: any error means "no contract" or "all misses".
type cacheReader struct {
	rdb    redis.UniversalClient
	prefix string
	model  string
}

func newCacheReader(cfg Config) (*cacheReader, error) {
	if cfg.RedisURL == "" {
		return &cacheReader{}, nil
	}
	url, addrs, clustered := clusterNodeURL(cfg.RedisURL)
	opts, err := redis.ParseURL(url)
	if err != nil {
		return nil, fmt.Errorf("embedfleet: EMBEDFLEET_REDIS_URL: %w", err)
	}
	if cfg.RedisUsername != "" {
		opts.Username = cfg.RedisUsername
	}
	if cfg.RedisPassword != "" {
		opts.Password = cfg.RedisPassword
	}
	if cfg.RedisSSLCAFile != "" {
		if opts.TLSConfig == nil {
			return nil, errors.New("embedfleet: EMBEDFLEET_REDIS_SSL_CAFILE is set but EMBEDFLEET_REDIS_URL is not rediss://")
		}
		pool, err := certPool(cfg.RedisSSLCAFile, "EMBEDFLEET_REDIS_SSL_CAFILE")
		if err != nil {
			return nil, err
		}
		opts.TLSConfig.RootCAs = pool
	}
	opts.DialTimeout, opts.ReadTimeout, opts.WriteTimeout = cfg.RedisTimeout, cfg.RedisTimeout, cfg.RedisTimeout
	opts.MaxRetries = 1 // one retry (a pooled connection the server closed), then fail open
	reader := &cacheReader{prefix: cfg.CacheKeyPrefix, model: cfg.ModelName}
	if clustered {
		// go-redis's cluster client: it discovers the nodes from this one, and a pipeline is one
		// batch per node, sent in parallel.
		reader.rdb = redis.NewClusterClient(&redis.ClusterOptions{
			Addrs: addrs, Username: opts.Username, Password: opts.Password,
			TLSConfig: opts.TLSConfig, DialTimeout: opts.DialTimeout, ReadTimeout: opts.ReadTimeout,
			WriteTimeout: opts.WriteTimeout, MaxRetries: opts.MaxRetries,
		})
	} else {
		reader.rdb = redis.NewClient(opts)
	}
	return reader, nil
}

// clusterNodeURL turns redis+cluster://host:port/0 (or rediss+cluster://, or several nodes:
// redis+cluster://h1:p1,h2:p2/0) into the URL of the first node and the addresses of all;
// clustered is false for a plain Redis URL, returned unchanged.
func clusterNodeURL(url string) (string, []string, bool) {
	for scheme, plain := range map[string]string{"redis+cluster://": "redis://", "rediss+cluster://": "rediss://"} {
		if !strings.HasPrefix(strings.ToLower(url), scheme) {
			continue
		}
		rest := url[len(scheme):]
		netloc, path := rest, ""
		if i := strings.Index(rest, "/"); i >= 0 {
			netloc, path = rest[:i], rest[i:]
		}
		credentials, hosts := "", netloc
		if i := strings.LastIndex(netloc, "@"); i >= 0 {
			credentials, hosts = netloc[:i+1], netloc[i+1:]
		}
		addrs := strings.Split(hosts, ",")
		return plain + credentials + addrs[0] + path, addrs, true
	}
	return url, nil, false
}

func (c *cacheReader) enabled() bool { return c.rdb != nil }

func (c *cacheReader) contract(ctx context.Context) (ModelContract, bool) {
	if c.rdb == nil {
		return ModelContract{}, false
	}
	fields, err := c.rdb.HGetAll(ctx, ContractKey(c.prefix, c.model)).Result()
	if err != nil {
		return ModelContract{}, false
	}
	return ParseModelContract(fields)
}

// EntryFields are what a reader fetches of a cache entry (one HMGET), in this order: the input
// of ServableEntry (schemas/cache_layout.py ENTRY_FIELDS).
var EntryFields = []string{"vector", "model", "dim", "tokens"}

// CacheEntry is a cache entry that may be served.
type CacheEntry struct {
	Vector      []float32
	Tokens      int
	TokensKnown bool // false in entries written before workers stored the count
}

// ServableEntry is the one rule for serving a cache entry, the twin of schemas/cache_layout.py
// servable_entry (both are tested against schemas/testdata/cache_entries.json). values are the
// entry's EntryFields as an HMGET returns them (nil where a field is absent; all nil for a
// missing key or a key of another Redis type). Served only when model is exactly the model asked
// for, dim is the width asked for in plain decimal, vector is exactly 4*dim bytes of finite
// little-endian float32 numbers, and tokens, when present, is 1 to 9 ASCII digits. Anything
// else is a miss, which the worker that computes the text overwrites.
func ServableEntry(values []any, model string, dim int) (CacheEntry, bool) {
	if len(values) != len(EntryFields) || dim <= 0 {
		return CacheEntry{}, false
	}
	fields := make([]*string, len(values))
	for i, v := range values {
		switch v := v.(type) {
		case string:
			fields[i] = &v
		case []byte:
			s := string(v)
			fields[i] = &s
		case nil:
		default:
			return CacheEntry{}, false
		}
	}
	vector, entryModel, entryDim, tokens := fields[0], fields[1], fields[2], fields[3]
	if vector == nil || len(*vector) != 4*dim || entryModel == nil || *entryModel != model ||
		entryDim == nil || *entryDim != strconv.Itoa(dim) {
		return CacheEntry{}, false
	}
	entry := CacheEntry{}
	if tokens != nil {
		if !plainCount(*tokens) {
			return CacheEntry{}, false
		}
		entry.Tokens, _ = strconv.Atoi(*tokens) // at most 9 digits: cannot fail
		entry.TokensKnown = true
	}
	entry.Vector = float32sLE([]byte(*vector))
	for _, x := range entry.Vector {
		if f := float64(x); math.IsNaN(f) || math.IsInf(f, 0) {
			return CacheEntry{}, false
		}
	}
	return entry, true
}

// plainCount: 1 to 9 ASCII digits (Atoi alone takes a sign, and overflows where Python does not).
func plainCount(s string) bool {
	if len(s) == 0 || len(s) > 9 {
		return false
	}
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return false
		}
	}
	return true
}

// lookup returns the cached vector of each content hash (nil for a miss), in one pipelined round
// trip. Only ServableEntry's verdict serves an entry; a key of another type is a miss for that
// key alone (go-redis keeps each command's error), any other error makes the batch all misses.
func (c *cacheReader) lookup(ctx context.Context, keys []string, dim int) [][]float32 {
	found := make([][]float32, len(keys))
	for i, entry := range c.lookupEntries(ctx, keys, dim) {
		if entry != nil {
			found[i] = entry.Vector
		}
	}
	return found
}

// lookupEntries is lookup with the whole servable entry (its token count too); nil for a miss.
func (c *cacheReader) lookupEntries(ctx context.Context, keys []string, dim int) []*CacheEntry {
	found := make([]*CacheEntry, len(keys))
	if c.rdb == nil || len(keys) == 0 {
		return found
	}
	pipe := c.rdb.Pipeline()
	cmds := make([]*redis.SliceCmd, len(keys))
	for i, key := range keys {
		cmds[i] = pipe.HMGet(ctx, VectorKey(c.prefix, c.model, dim, key), EntryFields...)
	}
	_, _ = pipe.Exec(ctx) // the first command error; each command's own is checked below
	for _, cmd := range cmds {
		if err := cmd.Err(); err != nil && !isWrongType(err) {
			return make([]*CacheEntry, len(keys)) // fail open: the cache is down, not this entry
		}
	}
	for i, cmd := range cmds {
		if cmd.Err() != nil {
			continue
		}
		if entry, ok := ServableEntry(cmd.Val(), c.model, dim); ok {
			found[i] = &entry
		}
	}
	return found
}

func isWrongType(err error) bool {
	var replyErr redis.Error
	return errors.As(err, &replyErr) && strings.HasPrefix(replyErr.Error(), "WRONGTYPE")
}

func (c *cacheReader) close() error {
	if c.rdb == nil {
		return nil
	}
	return c.rdb.Close()
}

func float32sLE(raw []byte) []float32 {
	vector := make([]float32, len(raw)/4)
	for i := range vector {
		vector[i] = math.Float32frombits(binary.LittleEndian.Uint32(raw[4*i:]))
	}
	return vector
}
