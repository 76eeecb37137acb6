package embedfleet

import (
	"context"
	"encoding/json"
	"errors"
	"net"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/twmb/franz-go/pkg/kgo"
)

func header(record *kgo.Record, name string) string {
	for _, h := range record.Headers {
		if h.Key == name {
			return string(h.Value)
		}
	}
	return ""
}

func TestResolveLongTakesTheCallOverTheConfig(t *testing.T) {
	for _, c := range []struct {
		name string
		cfg  Config
		opts EmbedOptions
		want longSettings
	}{
		{"nothing set", Config{}, EmbedOptions{}, longSettings{}},
		{"truncate", Config{}, EmbedOptions{Long: LongTruncate, Overlap: new(8)}, longSettings{}},
		{"call", Config{}, EmbedOptions{Long: LongPool}, longSettings{mode: LongPool, spec: "pool:32"}},
		{"config", Config{Long: LongChunks, Overlap: new(16)}, EmbedOptions{},
			longSettings{mode: LongChunks, spec: "chunks:16"}},
		{"call over config", Config{Long: LongChunks, Overlap: new(16)}, EmbedOptions{Long: LongPool, Overlap: new(0)},
			longSettings{mode: LongPool, spec: "pool:0"}},
		{"call truncates", Config{Long: LongPool}, EmbedOptions{Long: LongTruncate}, longSettings{}},
		{"config overlap", Config{Overlap: new(48)}, EmbedOptions{Long: LongPool},
			longSettings{mode: LongPool, spec: "pool:48"}},
	} {
		got, err := resolveLong(c.cfg, c.opts)
		if err != nil || got.mode != c.want.mode || got.spec != c.want.spec {
			t.Errorf("%s: %+v (%v), want %+v", c.name, got, err, c.want)
		}
	}
	if _, err := resolveLong(Config{}, EmbedOptions{Long: "slide"}); err == nil {
		t.Error("an unknown mode must be an error")
	}
	if _, err := resolveLong(Config{Long: LongPool, Overlap: new(300)}, EmbedOptions{}); err == nil {
		t.Error("an overlap over WindowOverlapMax must be an error")
	}
}

func TestPlanKeysLongRequestsByTheirSpec(t *testing.T) {
	p, err := planRequests([]string{"x", "x"}, "fp", "query", 128, "chunks:0")
	if err != nil {
		t.Fatal(err)
	}
	want, _ := ContentHashLong("x", "fp", "query", 128, "chunks:0")
	plain, _ := ContentHash("x", "fp", "query", 128)
	if len(p.distinct) != 1 || p.distinct[0].key != want || want == plain {
		t.Errorf("distinct %+v, want the key %s", p.distinct, want)
	}
	noModel, _ := planRequests([]string{"x"}, "", "", 0, "pool:32")
	if noModel.byContentHash || noModel.distinct[0].key != PartitionKey("x") {
		t.Errorf("without a fingerprint: %+v", noModel.distinct[0])
	}
}

func TestRequestRecordEncodesLongInputs(t *testing.T) {
	decode := func(record *kgo.Record) map[string]any {
		t.Helper()
		var body map[string]any
		if err := json.Unmarshal(record.Value, &body); err != nil {
			t.Fatal(err)
		}
		return body
	}
	opts := EmbedOptions{Task: "query", Dimensions: 128}

	plain := requestRecord("embed.requests", "k1", "id1", "text", opts, longSettings{}, "embed.results.go-x")
	body := decode(plain)
	if _, has := body["long"]; has {
		t.Errorf("truncate must be omitted on the wire: %s", plain.Value)
	}
	if _, has := body["overlap"]; has {
		t.Errorf("a truncate request carries no overlap: %s", plain.Value)
	}
	if header(plain, "schema") != SchemaVersion || header(plain, "content-type") != "application/json" ||
		string(plain.Key) != "k1" || plain.Topic != "embed.requests" {
		t.Errorf("plain record: key %s, headers %+v", plain.Key, plain.Headers)
	}
	if body["id"] != "id1" || body["text"] != "text" || body["task"] != "query" || body["dimensions"] != 128.0 ||
		body["encoding_format"] != "base64" || body["reply_to"] != "embed.results.go-x" {
		t.Errorf("plain body %s", plain.Value)
	}

	long, _ := resolveLong(Config{}, EmbedOptions{Long: LongPool})
	pool := requestRecord("embed.requests", "k2", "id2", "text", opts, long, "r")
	body = decode(pool)
	if body["long"] != "pool" || header(pool, "schema") != LongInputsSchemaVersion || string(pool.Key) != "k2" {
		t.Errorf("pool record %s, headers %+v", pool.Value, pool.Headers)
	}
	if _, has := body["overlap"]; has {
		t.Errorf("the default overlap is left to the workers: %s", pool.Value)
	}

	long, _ = resolveLong(Config{}, EmbedOptions{Long: LongChunks, Overlap: new(0)})
	chunks := requestRecord("embed.requests", "k3", "id3", "text", opts, long, "r")
	body = decode(chunks)
	if body["long"] != "chunks" || body["overlap"] != 0.0 || header(chunks, "schema") != "2" {
		t.Errorf("chunks record %s, headers %+v", chunks.Value, chunks.Headers)
	}
}

func TestDecodeResultsWithChunks(t *testing.T) {
	c := &Client{pending: map[string]waiter{}}
	pooled := EncodeVectorBase64([]float32{0.6, 0.8})
	second := EncodeVectorBase64([]float32{0, 1})
	ch := make(chan wireResult, 1)
	c.pending["r1"] = waiter{ch: ch, key: "k", dim: 2}
	c.dispatch([]byte(`{"id":"r1","key":"k","model":"m","dim":2,"vector_b64":"` + pooled + `","tokens":700,` +
		`"truncated":false,"windows":2,"chunks":[{"start":0,"end":12,"tokens":256,"vector":[1.0,0.0]},` +
		`{"start":9,"end":20,"tokens":444,"vector_b64":"` + second + `"}]}`))
	if len(ch) != 1 {
		t.Fatal("the result was not delivered")
	}
	embeddings := make([]Embedding, 3)
	entry := &distinctText{key: "k", text: "t", indices: []int{0, 2}}
	if failures := c.record(<-ch, entry, embeddings, nil); len(failures) != 0 {
		t.Fatalf("failures %+v", failures)
	}
	e := embeddings[0]
	if e.Windows != 2 || e.Tokens != 700 || e.Cached || e.Truncated || len(e.Vector) != 2 || e.Vector[1] != 0.8 {
		t.Errorf("embedding %+v", e)
	}
	if len(e.Chunks) != 2 || e.Chunks[0].Start != 0 || e.Chunks[0].End != 12 || e.Chunks[0].Tokens != 256 ||
		e.Chunks[0].Vector[0] != 1 || e.Chunks[1].Start != 9 || e.Chunks[1].Tokens != 444 || e.Chunks[1].Vector[1] != 1 {
		t.Errorf("chunks %+v", e.Chunks)
	}
	// A repeated text gets its own copies, the chunks' vectors too.
	other := embeddings[2]
	if len(other.Chunks) != 2 || &other.Chunks[0].Vector[0] == &e.Chunks[0].Vector[0] || &other.Vector[0] == &e.Vector[0] ||
		&other.Chunks[0] == &e.Chunks[0] {
		t.Errorf("the repeated text shares memory: %+v", other)
	}
	if c.Stats().Computed != 2 {
		t.Errorf("stats %+v", c.Stats())
	}

	// A chunk without a vector, or of another width, makes the result invalid.
	for _, bad := range []string{
		`{"vector":[1,0],"windows":1,"chunks":[{"start":0,"end":1,"tokens":1}]}`,
		`{"vector":[1,0],"windows":1,"chunks":[{"start":0,"end":1,"tokens":1,"vector":[1]}]}`,
		`{"vector":[1,0],"windows":1,"chunks":[{"start":0,"end":1,"tokens":1,"vector_b64":"AAA"}]}`,
		`{"vector":[1,0],"windows":1,"chunks":[{"start":5,"end":1,"tokens":1,"vector":[1,0]}]}`,
	} {
		var result wireResult
		if err := json.Unmarshal([]byte(bad), &result); err != nil {
			t.Fatal(err)
		}
		failures := c.record(result, &distinctText{indices: []int{1}}, embeddings, nil)
		if len(failures) != 1 || failures[0].Code != "invalid_result" || embeddings[1].Vector != nil {
			t.Errorf("%s: failures %+v", bad, failures)
		}
	}
}

func TestChunkOfSlicesCodePoints(t *testing.T) {
	text := "héllo wörld ✓"
	for _, c := range []struct {
		start, end int
		want       string
	}{{0, 5, "héllo"}, {6, 11, "wörld"}, {12, 13, "✓"}, {0, 13, text}, {4, 4, ""}, {13, 13, ""}, {10, 99, "d ✓"}} {
		if got := (Chunk{Start: c.start, End: c.end}).Of(text); got != c.want {
			t.Errorf("[%d, %d) = %q, want %q", c.start, c.end, got, c.want)
		}
	}
}

// countingHook counts the pipelines (cache lookups) a Redis client sends.
type countingHook struct{ pipelines atomic.Int64 }

func (h *countingHook) DialHook(next redis.DialHook) redis.DialHook { return next }
func (h *countingHook) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return next
}
func (h *countingHook) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		h.pipelines.Add(1)
		return next(ctx, cmds)
	}
}

// TestLongRequestsSkipTheCache: no Kafka and no Redis listen (the calls time out), but the
// cache lookup is attempted for plain texts only, never for pool or chunks.
func TestLongRequestsSkipTheCache(t *testing.T) {
	listener, err := net.Listen("tcp", "127.0.0.1:0") // a port nothing answers on once closed
	if err != nil {
		t.Fatal(err)
	}
	dead := listener.Addr().String()
	_ = listener.Close()
	cfg := Config{KafkaBootstrap: []string{dead}, RequestsTopic: "embed.requests", ResultsTopic: "embed.results",
		ModelName: DefaultModel, ModelFingerprint: "fp", ModelDim: 2, ClientID: "test", CacheKeyPrefix: "embedfleet",
		RedisURL: "redis://" + dead + "/0", RedisTimeout: 100 * time.Millisecond}
	cache, err := newCacheReader(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer cache.close()
	hook := &countingHook{}
	cache.rdb.AddHook(hook)
	kafka, err := kgo.NewClient(kgo.SeedBrokers(dead))
	if err != nil {
		t.Fatal(err)
	}
	defer kafka.Close()
	c := &Client{cfg: cfg, kafka: kafka, cache: cache, pending: map[string]waiter{}}

	calls := []struct {
		opts      EmbedOptions
		pipelines int64
	}{
		{EmbedOptions{}, 1},
		{EmbedOptions{Long: LongPool}, 1},
		{EmbedOptions{Long: LongChunks, Overlap: new(8)}, 1},
		{EmbedOptions{Long: LongTruncate}, 2},
	}
	for _, call := range calls {
		call.opts.Timeout = 300 * time.Millisecond
		_, err := c.Embed(context.Background(), []string{"some text"}, call.opts)
		var timeout *TimeoutError
		if !errors.As(err, &timeout) {
			t.Fatalf("%+v: want a *TimeoutError, got %v", call.opts, err)
		}
		if got := hook.pipelines.Load(); got != call.pipelines {
			t.Errorf("%+v: %d cache lookups so far, want %d", call.opts, got, call.pipelines)
		}
	}
	if _, err := c.Embed(context.Background(), []string{"x"}, EmbedOptions{Long: "slide"}); err == nil ||
		!strings.Contains(err.Error(), "truncate, pool or chunks") {
		t.Errorf("an unknown mode: %v", err)
	}
}
